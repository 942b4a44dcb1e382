"""Checks every technique makes before a run starts Prefect or Dask."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from calypso.errors import OutputError, ParameterError, RawDataError
from calypso.registry import open_catalogue
from calypso.settings import CalypsoSettings
from calypso.tasks.raw.data_policy import RawDataset
from calypso.tasks.writers.failures import OUTPUT_ERRNOS


def require_registrable(
    input_path: str, raw: RawDataset | None, raw_file: str | None, settings: CalypsoSettings
) -> None:
    """Refuse, before any work, a run whose result the configured catalogue could not take.

    ICAT registers processed datasets of raw datasets of the data policy that
    have a sample name, in a proposal with an investigation on that beamline.
    """
    if settings.catalogue.backend != "icat":
        return
    if raw is None:
        raise ParameterError(
            f"{input_path}: the catalogue is ICAT, which registers raw datasets of the data "
            "policy only; reduce a dataset under RAW_DATA or use the sqlite catalogue"
        )
    if not raw.sample_name:
        raise RawDataError(
            f"{raw_file or input_path}: no sample name (N.1/sample/name), which ICAT requires; "
            "fix the Bliss file or register with the sqlite catalogue"
        )
    from calypso.registry.icat import IcatCatalogue

    catalogue = open_catalogue(settings)
    if isinstance(catalogue, IcatCatalogue):
        catalogue.require_investigation(raw.beamline, raw.proposal)


#: Room asked for beyond a technique's estimate: quick-look figures, NeXus metadata, logs.
OUTPUT_SLACK_BYTES = 8 * 2**20


def require_output_room(output_dir: str | Path, needed_bytes: float) -> None:
    """Refuse, before Prefect and Dask start, an output folder the results cannot go to:
    one that cannot be written (read-only file system, no permission) or on a file system
    with less free space than ``needed_bytes`` (the technique's estimate of its results and
    part files) and a little more. Nothing is left behind: the probe file has no name.

    A full disk met while writing is still reported clearly (the writers'
    :func:`~calypso.tasks.writers.failures.translating_write_errors`); this only spares the wait.
    """
    out = Path(output_dir)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write the results in {out}: {existing} is a file, not a folder")
    try:
        # An unnamed file (O_TMPFILE): what the file system really allows, for this user.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = OUTPUT_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
        raise OutputError(
            f"cannot write the results in {out}: {reason} in {existing}; choose a folder "
            "you can write to (--output DIR)"
        ) from None
    free = shutil.disk_usage(existing).free
    needed = int(needed_bytes) + OUTPUT_SLACK_BYTES
    if free < needed:
        raise OutputError(
            f"cannot write the results in {out}: its file system has {_size(free)} free and "
            f"this run needs about {_size(needed)} (results and their part files); free some "
            "space or choose another output folder (--output DIR)"
        )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
