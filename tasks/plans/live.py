"""Planning a live run (docs/live.md): finding the scan in progress that writes a raw
dataset, and its plan made as the offline planner makes it, from the frames seen so far
(diffraction: :func:`make_live_plan`; MX: :func:`make_live_mx_plan`).

No Prefect here: the live flow (``flows/online/live.py``) calls these in its planning step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import h5py

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.raw import bliss
from calypso.tasks.raw.lima_saving import (
    lima_detectors,
    lima_files,
    lima_template,
    open_lima,
    run_source,
)
from calypso.tasks.raw.live import LimaFiles, LiveScan

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


def read_while_written(raw_file: Path, read: Callable[[Any], T], timeout: float = 5.0) -> T:
    """``read(h5)`` on the dataset file being written. A reader may catch the file between
    two of the writer's flushes (before its SWMR mode): it looks again for ``timeout`` s,
    then raises a RawDataError naming the last failure."""
    failures: list[Exception] = []

    def attempt() -> tuple[T] | None:
        try:
            with open_lima(raw_file) as h5:
                return (read(h5),)
        except (OSError, KeyError, ValueError) as exc:
            failures.append(exc)
            return None

    try:
        return wait(attempt, timeout, "unreadable")[0]
    except RawDataError as exc:
        raise RawDataError(str(failures[-1]) if failures else str(exc)) from None


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
    names = lima_detectors(raw_dir, number)
    if len(names) > 1:
        raise ParameterError(
            f"scan {number} has Lima files of {', '.join(names)}: name one with --set detector="
        )
    return names[0] if names else None


def _scan_detector(raw_file: Path, number: int, named: str) -> str:
    """The detector of the scan whose Lima files' prefix is ``named``: the one of the
    dataset file's ``N.1/instrument`` groups the prefix starts with
    (``pilatus1m_CeO2_0000.h5`` -> ``pilatus1m``), else ``named``."""
    try:
        with open_lima(raw_file) as h5:
            instrument = h5.get(f"{number}.1/instrument")
            names = list(instrument) if isinstance(instrument, h5py.Group) else []
    except (OSError, KeyError, ValueError, RuntimeError):
        return named
    if named in names:
        return named
    started = sorted((n for n in names if named.startswith(n)), key=len)
    return started[-1] if started else named


def find_stream_scan(url: str, raw_file: Path, scans: list[int] | None, timeout: float) -> str:
    """The key of the blissdata scan writing ``raw_file``: the last one, or the next."""
    from blissdata.exceptions import NoScanAvailable

    from calypso.tasks.raw.live_streams import _connect, load_scan

    store = _connect(url)

    def matches(key: str) -> bool:
        scan = load_scan(store, key)
        same = Path(str(scan.info.get("filename", ""))).resolve() == raw_file.resolve()
        return same and (not scans or scan.number == scans[0])

    # Every scan created from now on is seen below: waiting "from now" at each call, a scan
    # created between two waits was missed (a run waited its 30 s in a busy CI run).
    since = store.get_last_scan_timetag()
    try:
        _, key = store.get_last_scan()
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
        files_name, name = name, detector or _scan_detector(raw_file, number, name)
        # Bliss's default names until the first file shows the beamline's (find_files).
        files = LimaFiles(
            lima_template(raw_file.parent, number, files_name),
            dataset_file=raw_file,
            scan=number,
            detector=name,
            stall_timeout=stall_timeout,
            find_files=lambda: lima_files(raw_file.parent, number, name),
        )
        return files, number, name
    from calypso.tasks.raw.live_streams import BlissdataScan

    key = key or find_stream_scan(source, raw_file, scans, stall_timeout)
    scan = BlissdataScan(source, key, detector=detector, stall_timeout=stall_timeout)
    return scan, scan.info.number, detector or ""


def entry_texts(raw_file: Path, number: int) -> tuple[str, str | None]:
    """Title and start time of entry ``N.1`` so far ("" and None while it is not there)."""
    try:  # open_raw: waits while the writer holds the file between two scans
        with bliss.open_raw(raw_file) as h5:
            entry = h5[f"{number}.1"]
            texts = [bliss._optional_text(entry, n) for n in ("title", "start_time")]
            return texts[0] or "", texts[1]
    except (RawDataError, OSError, KeyError, ValueError):
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
        checked_setup,
        output_bytes,
    )

    parameters, geometry = checked_setup(parameters, scan.source, str(raw_file))
    raw, out = _live_output(
        input_path, raw_file, scan.number, TECHNIQUE, output_dir, settings,
        output_bytes(scan.source.n_frames, parameters),
    )  # fmt: skip
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


def _live_output(
    input_path: str,
    raw_file: Path,
    number: int,
    technique: str,
    output_dir: str | None,
    settings: CalypsoSettings,
    output_size: int,
) -> tuple[Any, Path]:
    """The raw dataset being written (if under the data policy) and the run's output folder,
    checked as the offline planners check them (registrable, room for ``output_size``)."""
    from calypso.tasks.plans.preflight import require_output_room, require_registrable
    from calypso.tasks.raw.data_policy import RawDataset, output_folder

    try:
        raw = RawDataset.from_path(raw_file)
    except CalypsoError:
        raw = None
    if raw is not None:
        raw = raw.model_copy(update={"sample_name": _sample_name(raw_file, number)})
    out = output_folder(input_path, raw, technique, output_dir, settings.processed_data)
    require_registrable(input_path, raw, str(raw_file), settings)
    require_output_room(out, output_size)
    return raw, out


def _sample_name(raw_file: Path, number: int) -> str | None:
    try:  # as the offline planners read it, waiting while the writer holds the file
        return bliss.read_sample_name(raw_file, number)
    except (RawDataError, OSError, KeyError, ValueError):
        return None


# -- MX ---------------------------------------------------------------------------------


def live_pixel_mask(raw_file: Path, number: int, detector: str) -> Any:
    """The detector's pixel mask the dataset file holds for scan ``number`` (an array; None
    when it has none), read as the file is written (the writer may hold it in SWMR mode,
    which the offline readers do not open)."""

    def mask(h5) -> Any:
        found = h5.get(f"{number}.1/instrument/{detector}/pixel_mask")
        return found[()] if found is not None else None

    try:
        return read_while_written(raw_file, mask)
    except RawDataError as exc:
        raise RawDataError(
            f"{raw_file}: the pixel mask of scan {number} cannot be read ({exc})"
        ) from None


def make_live_mx_plan(
    input_path: str,
    parameters: Any,
    first: Any,
    output_dir: str | None,
    settings: CalypsoSettings,
    chunk_size: int,
) -> Any:
    """The MX plan of a scan in progress (``first``: what its first frames and its dataset
    file say, :class:`calypso.flows.online.live_base.FirstFrames`), made as the offline planner
    makes it (geometry from the dataset file's detector group and the parameters, grid
    from the title, the same checks, output folder and file) for the images the scan
    takes: ``npoints``, else the grid's cells. Chunks are a grid row (``chunk_size``
    without a grid), unless the parameters say."""

    import numpy as np

    from calypso.tasks.plans.mx import BYTES_PER_IMAGE, TECHNIQUE, MXPlan, require_unmasked
    from calypso.tasks.raw import mx_images
    from calypso.tasks.raw.frames import read_image

    raw_file, number, detector = Path(first.raw_file), first.number, first.detector
    entry = f"{number}.1"

    def geometry(h5) -> dict:
        found = mx_images.hdf5_geometry(h5[f"{entry}/instrument"], detector)
        if not found:
            raise KeyError("no detector geometry yet")
        return found

    # The writer puts the detector's geometry in the dataset file as the scan starts.
    try:
        found = read_while_written(raw_file, geometry)
    except RawDataError:
        found = {}  # none: the parameters must give the geometry
    where = f"{raw_file} scan {number} (live: the geometry must be there when the scan starts)"
    geometry = mx_images.resolve_geometry(found, parameters, where)
    grid = parameters.grid or mx_images.grid_from_title(first.title)
    cells = grid[0] * grid[1] if grid else None
    n_frames = first.npoints or cells or first.frames
    if grid is not None and cells != n_frames:
        raise ParameterError(
            f"{raw_file} scan {number}: a {grid[0]}x{grid[1]} grid holds {cells} images, the "
            f"scan takes {n_frames}; set grid=[ROWS,COLUMNS]"
        )
    dtype = np.dtype(first.dtype)
    pixel_mask = live_pixel_mask(raw_file, number, detector)
    dataset = f"{entry}/instrument/{detector}/data"
    source = run_source(first.lima_file, first.dataset, n_frames, first.frame_shape, first.dtype)
    scan = mx_images.MXScan(
        name=entry,
        description=f"{raw_file}::/{dataset}",
        sources=[source],
        geometry=geometry,
        pixel_mask=f"{raw_file}::/{entry}/instrument/{detector}/pixel_mask"
        if pixel_mask is not None
        else None,
        saturation=float(np.iinfo(dtype).max) if dtype.kind == "u" else None,
        grid=grid,
        title=first.title,
        start_time=first.start_time,
    )
    if parameters.mask is not None:
        mask = read_image(parameters.mask, "mask")
        if mask.shape != scan.frame_shape:
            raise ParameterError(
                f"mask {parameters.mask} has shape {mask.shape}, the images of "
                f"{scan.description} {scan.frame_shape}"
            )
    # The offline check, on the pixel mask read from the file the writer holds (the
    # offline readers cannot open it), naming where the mask is.
    require_unmasked(scan, parameters, pixel_mask)
    raw, out = _live_output(
        input_path, raw_file, number, TECHNIQUE, output_dir, settings,
        2 * BYTES_PER_IMAGE * n_frames,
    )  # fmt: skip
    return MXPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file),
        scans=[scan],
        parameters=parameters,
        output_dir=str(out),
        output_file=str(out / f"{raw_file.name.split('.')[0]}.h5"),
        chunk_size=parameters.chunk_size or (grid[1] if grid else chunk_size),
    )
