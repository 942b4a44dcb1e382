"""Writing results as NeXus/HDF5, the way ESRF users already read them.

Everything is written under a temporary name and renamed into place only when
complete, so a failed run never leaves a file that looks finished. Inside a flow
run the finished files wait in the run's part folder and are renamed into place
together with their catalogue record (:mod:`calypso.tasks.writers.publication`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import calypso
from calypso.errors import OutputError
from calypso.registry.access.landlock import in_proposal
from calypso.tasks.writers.failures import translating_write_errors
from calypso.tasks.writers.permissions import Permissions, default_permissions
from calypso.tasks.writers.publication import PARTIAL_PREFIX, active


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
@translating_write_errors  # a full disk or read-only folder: one OutputError
def atomic_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Temporary paths for ``finals``; renamed onto them only if the block succeeds.

    The files are renamed in the order given, so put the file that marks the
    result as complete (the NeXus file) last. In a flow run they are staged in its
    part folder, and renamed when the run publishes its results with their record.
    """
    publication = active()
    if publication is not None:
        try:
            staged = [publication.stage(final) for final in finals]
        except OSError as exc:
            raise OutputError(f"cannot stage results in {publication.staging}: {exc}") from None
        try:
            yield staged
        except BaseException:
            for path in staged:
                path.unlink(missing_ok=True)
            raise
        for path, final in zip(staged, finals, strict=True):
            if path.exists():
                publication.defer(path, final)
        return
    # Written in a private folder beside each result, so that nothing is visible before
    # it has the results' group and mode.
    permissions = default_permissions()
    private = {f.parent: f.parent / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}" for f in finals}
    for parent, folder in private.items():
        try:
            permissions.make_work_dir(folder, exist_ok=False)
        except OSError as exc:
            _remove_private(private.values())
            raise OutputError(f"cannot create the output folder {parent}: {exc}") from None
    temporaries = [private[final.parent] / final.name for final in finals]
    try:
        yield temporaries
        for temporary, final in zip(temporaries, finals, strict=True):
            if temporary.exists():
                permissions.apply(temporary)
                os.replace(temporary, final)
    finally:
        _remove_private(private.values())


def _remove_private(folders: Iterable[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def new_work_dir(
    output_dir: str | Path, name: str | None = None, permissions: Permissions | None = None
) -> Path:
    """A hidden scratch folder in the output folder for the tasks' part files (``name``:
    the same folder again, e.g. for a retry of the same flow run), the owner's only; the
    output folders it needs are made with the results' group and mode (``permissions``,
    default: the configured ones)."""
    work = Path(output_dir) / f"{PARTIAL_PREFIX}{name or uuid.uuid4().hex[:12]}"
    try:
        (permissions or default_permissions()).make_work_dir(work, exist_ok=name is not None)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {output_dir}: {exc}") from None
    return work


def remove_work_dir(work_dir: str | Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


def software_versions() -> dict[str, str]:
    """Versions of the software that shaped a result (a new dict each call)."""
    return dict(_software_versions())


@functools.cache
def _software_versions() -> dict[str, str]:
    # The installed distributions' own versions: importing pyFAI, fabio and silx to ask
    # them cost a spectroscopy run that uses none of them ~0.2 s.
    from importlib.metadata import version

    return {
        "calypso": calypso.__version__,
        "pyFAI": version("pyFAI"),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "silx": version("silx"),
        "fabio": version("fabio"),
        "dask": version("dask"),
        "prefect": version("prefect"),
        "python": platform.python_version(),
    }


def set_nx_class(node: h5py.Group, nx_class: str) -> None:
    node.attrs["NX_class"] = nx_class


def write_root_attributes(h5: h5py.File, default_entry: str) -> None:
    set_nx_class(h5, "NXroot")
    h5.attrs["creator"] = f"calypso {calypso.__version__}"
    h5.attrs["file_time"] = now_iso()
    h5.attrs["default"] = default_entry


logger = logging.getLogger(__name__)

RAW_GROUPS = ("instrument", "measurement", "sample")  # what a result links to of its scan


def link_raw_groups(
    entry: h5py.Group,
    raw_file: Path,
    raw_entry: str,
    output_dir: Path,
    expand: tuple[str, ...] = (),
) -> None:
    """External links from a processed entry to the raw ``instrument``, ``measurement``, ``sample``.

    The raw file is named relative to the output folder, so the links still
    resolve when the whole proposal tree is mounted elsewhere. Groups named in ``expand``
    are made here (NXcollection) with one link per raw member, so that results can be
    added beside the raw counters (``measurement/<detector>_integrated``, as ewoksxrpd).
    """
    relative = os.path.relpath(raw_file, output_dir)
    # Read where the kernel keeps it inside the proposal (registry/access/landlock.py).
    try:
        present = in_proposal(output_dir, _raw_groups, raw_file, raw_entry, expand)
    except OSError as exc:
        from calypso.tasks.raw.bliss import held_by_writer

        if not held_by_writer(exc):
            raise
        # Its writer died holding it (a scan killed mid-way, whose frames are reduced,
        # marked partial): the groups linked whole, unread; the links resolve once the
        # file's flags are cleared (h5clear -s).
        logger.warning("%s is held open by a writer that stopped: %s", raw_file, exc)
        present = dict.fromkeys(RAW_GROUPS)
    for name, members in present.items():
        if members is None:
            entry[name] = h5py.ExternalLink(relative, f"/{raw_entry}/{name}")
            continue
        group = entry.create_group(name)
        set_nx_class(group, "NXcollection")
        for member in members:
            group[member] = h5py.ExternalLink(relative, f"/{raw_entry}/{name}/{member}")


def _raw_groups(raw_file: Path, raw_entry: str, expand: tuple[str, ...]) -> dict:
    """The raw groups an entry links to, with their members for those in ``expand``."""
    from calypso.tasks.raw.lima_saving import open_growing

    with open_growing(raw_file) as raw:  # a scan's file still written: its SWMR reader
        return {
            name: list(raw[raw_entry][name]) if name in expand else None
            for name in RAW_GROUPS
            if name in raw[raw_entry]
        }


def write_process(
    parent: h5py.Group,
    name: str,
    *,
    parameters: dict[str, Any],
    provenance: dict[str, Any],
) -> h5py.Group:
    """An NXprocess with program, versions and the full parameter set as JSON."""
    process = parent.create_group(name)
    set_nx_class(process, "NXprocess")
    versions = software_versions()
    process["program"] = "calypso"
    process["version"] = versions["calypso"]
    process["date"] = now_iso()
    configuration = process.create_group("configuration")
    set_nx_class(configuration, "NXnote")
    configuration["type"] = "application/json"
    configuration["data"] = json.dumps(parameters, indent=2, sort_keys=True, default=str)
    notes = process.create_group("provenance")
    set_nx_class(notes, "NXnote")
    notes["type"] = "application/json"
    notes["data"] = json.dumps(
        {**provenance, "software": versions, "host": platform.node()},
        indent=2,
        sort_keys=True,
        default=str,
    )
    return process


def create_nxdata(
    parent: h5py.Group,
    name: str,
    *,
    signal: str,
    axes: list[str],
) -> h5py.Group:
    group = parent.create_group(name)
    set_nx_class(group, "NXdata")
    group.attrs["signal"] = signal
    group.attrs["axes"] = axes
    return group


def write_axis(group: h5py.Group, name: str, values: np.ndarray, units: str) -> None:
    dataset = group.create_dataset(name, data=values)
    if units:
        dataset.attrs["units"] = units


def mark_scans_that_ended_early(output: Path, raw_file: Path) -> list[str]:
    """Mark the result ``output`` partial where a scan it reduces (an entry named as the
    scan's, ``N.1``) did not end well in the Bliss dataset file ``raw_file``: its
    ``end_reason`` is not SUCCESS (aborted, failed). Root ``status`` "partial", and the
    entry's ``status`` "partial: scan N.1 ended early (USER_ABORT)", as a live run marks
    a scan it saw end early; a result its writer marked already is left as it is. What
    was marked, one line a scan.

    Examples
    --------
    >>> mark_scans_that_ended_early(Path("staged/CeO2_0001.h5"), Path("CeO2_0001.h5"))
    ... # doctest: +SKIP
    ['scan 1.1 ended early (USER_ABORT)']
    """
    from calypso.tasks.raw.bliss import SCAN_ENTRY, _optional_text, open_raw

    with h5py.File(output, "r") as h5:
        if h5.attrs.get("status") == "partial":
            return []
        entries = [name for name in h5 if SCAN_ENTRY.match(name)]
    if not entries:
        return []
    with open_raw(raw_file) as raw:
        reasons = {name: _optional_text(raw[name], "end_reason") for name in entries if name in raw}
    early = {name: why for name, why in reasons.items() if why not in (None, "SUCCESS")}
    if not early:
        return []
    lines = [f"scan {name} ended early ({why})" for name, why in early.items()]
    with h5py.File(output, "a") as h5:
        h5.attrs["status"] = "partial"
        for name, line in zip(early, lines, strict=True):
            if "status" not in h5[name]:
                h5[name]["status"] = f"partial: {line}"
    return lines
