"""Planning a live run (docs/live.md): finding the scan in progress that writes a raw
dataset, and its plan made as the offline planner makes it, from the frames seen so far.

No Prefect here: the live flow (``flows/online/live.py``) calls these in its planning step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.raw import bliss
from calypso.tasks.raw.live import LimaFiles, LiveScan, lima_template, open_lima

T = TypeVar("T")


def wait(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.1) -> T:
    """``condition()`` once it is true, or a RawDataError ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise RawDataError(f"{what} within {timeout:.0f} s")
        time.sleep(poll)


def running_entry(raw_file: Path, scans: list[int] | None) -> int | None:
    """The scan being written: the one asked for, else the last entry without end_time,
    else the last one (ended already: it is reduced all the same)."""
    try:
        with open_lima(raw_file) as h5:
            if scans:
                return scans[0] if f"{scans[0]}.1" in h5 else None
            numbers = sorted(int(n.split(".")[0]) for n in h5 if bliss.SCAN_ENTRY.match(n))
            running = [n for n in numbers if "end_time" not in h5[f"{n}.1"]]
            return (running or numbers or [None])[-1]
    except (OSError, KeyError, ValueError):
        return None  # not there yet, or caught between two writes


def lima_detector(raw_dir: Path, number: int, wanted: str | None) -> str | None:
    """The detector whose first Lima file is in the scan's folder (the one asked for)."""
    if wanted:
        return wanted
    files = (raw_dir / f"scan{number:04d}").glob("*_0000.h5")
    names = sorted(p.name[: -len("_0000.h5")] for p in files)
    if len(names) > 1:
        raise ParameterError(
            f"scan {number} has Lima files of {', '.join(names)}: name one with --set detector="
        )
    return names[0] if names else None


def find_stream_scan(url: str, raw_file: Path, scans: list[int] | None, timeout: float) -> str:
    """The key of the blissdata scan writing ``raw_file``: the last one, or the next."""
    from blissdata.exceptions import NoScanAvailable

    from calypso.tasks.raw.live_streams import _connect

    store = _connect(url)

    def matches(key: str) -> bool:
        scan = store.load_scan(key)
        same = Path(str(scan.info.get("filename", ""))).resolve() == raw_file.resolve()
        return same and (not scans or scan.number == scans[0])

    since = None
    try:
        since, key = store.get_last_scan()
        if matches(key):
            return key
    except NoScanAvailable:
        pass
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            # Short waits: a long blocking read outlasts the client's socket time-out.
            since, key = store.get_next_scan(since=since, timeout=min(max(left, 0.01), 1.0))
        except NoScanAvailable:
            continue
        if matches(key):
            return key
    raise RawDataError(f"no scan writing {raw_file} started on {url} within {timeout:.0f} s")


def open_live_scan(
    source: str,
    raw_file: Path,
    scans: list[int] | None,
    detector: str | None,
    *,
    key: str | None = None,
    stall_timeout: float = 60.0,
) -> tuple[LiveScan, int, str]:
    """The scan in progress writing ``raw_file``, its number and detector, from its growing
    files (``source="files"``) or the blissdata server at ``source`` (a redis:// URL)."""
    if source == "files":
        what = f"no scan started writing {raw_file}"
        number = wait(lambda: running_entry(raw_file, scans), stall_timeout, what)
        what = f"no Lima file appeared in {raw_file.parent / f'scan{number:04d}'}"
        name = wait(lambda: lima_detector(raw_file.parent, number, detector), stall_timeout, what)
        files = LimaFiles(
            lima_template(raw_file.parent, number, name),
            dataset_file=raw_file,
            scan=number,
            detector=name,
            stall_timeout=stall_timeout,
        )
        return files, number, name
    from calypso.tasks.raw.live_streams import BlissdataScan

    key = key or find_stream_scan(source, raw_file, scans, stall_timeout)
    scan = BlissdataScan(source, key, detector=detector, stall_timeout=stall_timeout)
    return scan, scan.info.number, detector or ""


def entry_texts(raw_file: Path, number: int) -> tuple[str, str | None]:
    """Title and start time of entry ``N.1`` so far ("" and None while it is not there)."""
    try:
        with open_lima(raw_file) as h5:
            entry = h5[f"{number}.1"]
            texts = [bliss._optional_text(entry, n) for n in ("title", "start_time")]
            return texts[0] or "", texts[1]
    except (OSError, KeyError, ValueError):
        return "", None


def make_live_plan(
    input_path: str,
    parameters: Any,
    raw_file: Path,
    scan: Any,
    output_dir: str | None,
    settings: CalypsoSettings,
    chunk_size: int,
) -> Any:
    """The plan of a scan in progress, made as the offline planner makes it (same
    parameters, geometry, output folder and file, the same checks) but from the frames
    seen so far, for the ``npoints`` the scan announced."""
    from calypso.tasks.plans.diffraction import (
        TECHNIQUE,
        IntegrationPlan,
        _absolute,
        load_geometry,
        output_bytes,
    )
    from calypso.tasks.plans.preflight import require_output_room, require_registrable
    from calypso.tasks.raw.data_policy import RawDataset, output_folder
    from calypso.tasks.raw.frames import read_image

    names = ("poni", "mask", "dark", "flat")
    parameters = parameters.model_copy(
        update={name: _absolute(getattr(parameters, name)) for name in names}
    )
    geometry = load_geometry(parameters)
    for name in names[1:]:
        location = getattr(parameters, name)
        if location is not None and read_image(location, name).shape != scan.source.frame_shape:
            raise ParameterError(
                f"{name} {location} does not have the shape of the frames "
                f"{scan.source.frame_shape}: use a {name} made for this detector"
            )
    try:
        raw = RawDataset.from_path(raw_file)
    except CalypsoError:
        raw = None
    if raw is not None:  # the file is being written (and may be in SWMR mode): no open_raw
        raw = raw.model_copy(update={"sample_name": _sample_name(raw_file, scan.number)})
    out = output_folder(input_path, raw, TECHNIQUE, output_dir, settings.processed_data)
    require_registrable(input_path, raw, str(raw_file), settings)
    require_output_room(out, output_bytes(scan.source.n_frames, parameters))
    return IntegrationPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file),
        scans=[scan],
        geometry=geometry,
        parameters=parameters,
        output_dir=str(out),
        output_file=str(out / f"{raw_file.stem}.h5"),
        chunk_size=parameters.chunk_size or chunk_size,
    )


def _sample_name(raw_file: Path, number: int) -> str | None:
    try:
        with open_lima(raw_file) as h5:
            return bliss._optional_text(h5[f"{number}.1"], "sample/name")
    except (OSError, KeyError, ValueError):
        return None
