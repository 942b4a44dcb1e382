"""Reading Bliss HDF5 dataset files, read-only and safely while Bliss writes.

A Bliss dataset file holds one NXentry per scan (``N.1``); detector frames are a
virtual dataset (VDS) over Lima's HDF5 files, a dataset stored in Lima's EDF files
(external storage), or one string a frame naming Lima's CBF or TIFF images
(``<file>::<index>``). HDF5 fills a VDS region whose source file is missing with the fill
value (zeros) without any error, and reads missing external bytes as zeros, so before
frames are read every source is checked: a missing or short Lima file is an error.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle, LZ4 ... with HDF5)
import numpy as np

from calypso.errors import ParameterError, RawDataError
from calypso.registry.access.links import file_references, names_frames, referenced_file

SCAN_ENTRY = re.compile(r"^(\d+)\.1$")


WRITER_HOLD_S = 10.0  # how long a file its writer holds (not in SWMR mode) is tried again


@contextmanager
def open_raw(path: str | Path) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only with file locking off (Bliss may hold it); a file still
    open for writing in SWMR mode (a scan being written) is opened as its SWMR reader.

    A file its writer holds outside SWMR mode (between two scans, say) cannot be opened at
    all while it does: it is tried again for ``WRITER_HOLD_S`` before giving up."""
    path = Path(path)
    if not path.exists():
        raise RawDataError(f"{path} does not exist")
    deadline = time.monotonic() + WRITER_HOLD_S
    while True:
        try:
            handle = _open_read_only(path)
            break
        except OSError as exc:
            held = held_by_writer(exc)
            if held and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if held:  # a writer that died leaves the flags set; clearing them is a write
                raise RawDataError(
                    f"{path} has been held open for writing for {WRITER_HOLD_S:g} s ({exc}); "
                    "if no process writes it any more, ask its owner to clear its flags "
                    f"with 'h5clear -s {path}'"
                ) from None
            raise RawDataError(
                f"{path} cannot be opened as HDF5 ({exc}); is it a Bliss dataset file?"
            ) from None
    try:
        yield handle
    finally:
        handle.close()


def held_by_writer(error: BaseException) -> bool:
    """Whether HDF5 refused a file because a writer holds it (its superblock says open
    for writing: a writer at work outside SWMR, or one that died holding it)."""
    return "already open for write" in str(error)


def _open_read_only(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except PermissionError:
        raise  # not a writer's hold: no SWMR reader would open it either
    except OSError:
        from calypso.tasks.raw.lima_saving import open_growing

        return open_growing(path)  # SWMR read, where the writer allows it


@dataclass(frozen=True)
class ScanInfo:
    """What a scan entry of a Bliss file holds."""

    number: int
    title: str
    start_time: str | None
    end_time: str | None
    # name: (frames, rows, columns); (frames,) for images named FILE::INDEX (CBF, TIFF)
    detectors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def entry(self) -> str:
        return f"{self.number}.1"

    @property
    def complete(self) -> bool:
        """Bliss writes ``end_time`` last: its presence marks a finished scan."""
        return self.end_time is not None


def require_ended(path: str | Path, info: ScanInfo) -> None:
    """Refuse a scan without ``end_time``: still being written, or cut short."""
    if not info.complete:
        title = f" ({info.title})" if info.title else ""
        raise RawDataError(
            f"{path}: scan {info.number}{title} has no end_time, so Bliss is still writing it "
            "(or it was interrupted); run again once it has finished, follow it with --live, "
            "or leave it out with --scan"
        )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return _text(value[()] if value.shape == () else value.ravel()[0])
    return str(value)


def _optional_text(group: h5py.Group, name: str) -> str | None:
    return _text(group[name][()]) if name in group else None


def scan_info(entry: h5py.Group, number: int) -> ScanInfo:
    """Describe one ``N.1`` entry: title, times, 2D detectors and 1D counters."""
    detectors: dict[str, tuple[int, ...]] = {}
    counters: dict[str, int] = {}
    instrument = entry.get("instrument")
    if isinstance(instrument, h5py.Group):
        for name, item in instrument.items():
            data = item.get("data") if isinstance(item, h5py.Group) else None
            # Frames, or images named one string a frame (FILE::INDEX: CBF, TIFF).
            if isinstance(data, h5py.Dataset) and (data.ndim == 3 or names_frames(data)):
                detectors[name] = tuple(data.shape)
    measurement = entry.get("measurement")
    if isinstance(measurement, h5py.Group):
        for name in measurement:
            try:
                item = measurement[name]
            except (KeyError, OSError):  # broken external link
                continue
            # One number a point (not a detector's images named one string a point).
            if isinstance(item, h5py.Dataset) and item.ndim == 1 and item.dtype.kind in "biuf":
                counters[name] = item.shape[0]
    return ScanInfo(
        number=number,
        title=_optional_text(entry, "title") or "",
        start_time=_optional_text(entry, "start_time"),
        end_time=_optional_text(entry, "end_time"),
        detectors=detectors,
        counters=counters,
    )


def list_scans(path: str | Path) -> list[ScanInfo]:
    """All scans of a Bliss dataset file, in scan order."""
    with open_raw(path) as h5:
        numbers = sorted(int(m.group(1)) for name in h5 if (m := SCAN_ENTRY.match(name)))
        if not numbers:
            raise RawDataError(
                f"{path} has no scan entries (groups named 'N.1'): it is not a Bliss dataset file"
            )
        return [scan_info(h5[f"{n}.1"], n) for n in numbers]


def select_scans(path: str | Path, wanted: list[int] | None) -> list[ScanInfo]:
    """The scans of a Bliss file, or those numbered ``wanted`` in that order.

    Raises
    ------
    RawDataError
        When a wanted scan is not in the file (the message lists those that are).
    """
    infos = list_scans(path)
    if not wanted:
        return infos
    by_number = {info.number: info for info in infos}
    missing = [n for n in wanted if n not in by_number]
    if missing:
        raise RawDataError(
            f"{path} has no scan {', '.join(map(str, missing))}; its scans are "
            f"{', '.join(map(str, by_number))}"
        )
    return [by_number[n] for n in wanted]


def choose_detector(path: str | Path, infos: list[ScanInfo], detector: str | None) -> str:
    """``detector``, or the only 2D detector of the scans ``infos``.

    Raises
    ------
    ParameterError
        When there is none, or several and none was named.
    """
    if detector is not None:
        return detector
    names = sorted({name for info in infos for name in info.detectors})
    if len(names) != 1:
        raise ParameterError(
            f"{path}: no 2D detector in the chosen scans"
            if not names
            else f"{path}: several 2D detectors ({', '.join(names)}): "
            "choose one with --set detector=NAME"
        )
    return names[0]


def counter_lengths(path: str | Path, scan: int) -> dict[str, int]:
    """Names and lengths of the 1D counters of scan ``scan``."""
    with open_raw(path) as h5:
        entry = f"{scan}.1"
        if entry not in h5:
            raise RawDataError(f"{path} has no scan {scan}")
        return scan_info(h5[entry], scan).counters


def read_sample_name(path: str | Path, scan: int | None = None) -> str | None:
    """The sample name Bliss stored with a scan (``N.1/sample/name``)."""
    with open_raw(path) as h5:
        entries = (
            [f"{scan}.1"] if scan is not None else sorted(n for n in h5 if SCAN_ENTRY.match(n))
        )
        for entry in entries:
            name = f"{entry}/sample/name"
            if name in h5:
                return _text(h5[name][()])
    return None


def missing_frame_sources(path: str | Path, dataset: str) -> list[str]:
    """Describe every VDS source of ``dataset`` that cannot deliver its frames.

    An empty list means all frames are backed by data. Source file names are
    resolved like HDF5 does: relative to the folder of the file holding the VDS.
    """
    return _source_problems(path, dataset)[0]


def _source_problems(path: str | Path, dataset: str) -> tuple[list[str], list[str]]:
    """What is wrong with the VDS sources of ``dataset``: (missing or short sources,
    sources whose frames do not match the virtual layout)."""
    path = Path(path)
    missing: list[str] = []
    mismatched: list[str] = []
    with open_raw(path) as h5:
        if dataset not in h5:
            raise RawDataError(f"{path} has no dataset {dataset}")
        dset = h5[dataset]
        references = file_references(dset)
        if references is not None:  # Lima's CBF, TIFF ... files, named frame by frame
            named: dict[Path, int] = {}  # file -> frames it must hold
            for name, index in references:
                file = referenced_file(path, name)
                named[file] = max(named.get(file, 0), index + 1)
            return referenced_problems(list(named), list(named.values())), mismatched
        if not dset.is_virtual:
            return _external_problems(path, dset), mismatched
        layout_dtype = dset.dtype
        seen: dict[tuple[str, str], tuple[tuple[int, ...], np.dtype] | str] = {}
        for source in dset.virtual_sources():
            source_path = virtual_source_path(path, source.file_name)
            key = (str(source_path), source.dset_name)
            if key not in seen:
                seen[key] = _source_dataset(source_path, source.dset_name)
            found = seen[key]
            if isinstance(found, str):
                missing.append(found)
                continue
            shape, dtype = found
            where = f"{source_path}::{source.dset_name}"
            first, extent = _selection(source.src_space, source.vspace)
            # A frame is the last two axes: the mapping must take whole frames of the source,
            # or HDF5 reads another region of each (larger frames) without any error.
            frame, mapped = tuple(shape[-2:]), tuple(extent[-2:])
            if len(shape) < 2 or frame != mapped or any(first[-2:]):
                mismatched.append(
                    f"{where} holds frames of {' x '.join(map(str, frame))} pixels but the "
                    f"virtual dataset maps {' x '.join(map(str, mapped))}: every frame would "
                    "be read wrongly (cut, shifted or padded)"
                )
            elif any(
                a + e > n for a, e, n in zip(first[:-2], extent[:-2], shape[:-2], strict=False)
            ):
                missing.append(
                    f"{where} holds {shape[0]} frames but the scan expects "
                    f"{first[0] + extent[0]} (Lima file incomplete?)"
                )
            if not np.can_cast(dtype, layout_dtype, casting="safe"):
                loss = (
                    "NaN and infinities would be read as wrong integers and fractions cut"
                    if dtype.kind == "f" and layout_dtype.kind in "iu"
                    else f"values {layout_dtype} cannot hold would be changed"
                )
                mismatched.append(
                    f"{where} holds {dtype} values but the virtual dataset is {layout_dtype}: "
                    f"HDF5 would convert them silently ({loss})"
                )
    return sorted(set(missing)), sorted(set(mismatched))


def referenced_problems(files: list[Path], frames: list[int]) -> list[str]:
    """What keeps the image files a dataset file names (``frames``: how many of each)
    from being read: missing, a CBF or TIFF image not wholly written, an EDF file or a
    multi-page TIFF short of its frames (its writer still at it, or the copy cut short)."""
    from calypso.tasks.raw.lima_saving import image_written, is_image

    problems = []
    for file, needed in zip(files, frames, strict=True):
        if file.is_dir():
            problems.append(f"{file} is a folder, not an image")
        elif not file.is_file():
            problems.append(f"{file} is missing")
        elif is_image(file) and not image_written(file):
            problems.append(f"{file} is not whole (still being written, or cut short)")
        elif (whole := _whole_frames(file, needed)) is not None and whole < needed:
            problems.append(
                f"{file} holds {whole} whole frames of the {needed} named (still being "
                "written, or cut short)"
            )
    return problems


def _whole_frames(file: Path, needed: int) -> int | None:
    """The whole frames of a file of several (an EDF file, a multi-page TIFF: each page
    there is whole, but all?); None for a file of one image."""
    from calypso.tasks.raw.edf import edf_look
    from calypso.tasks.raw.lima_saving import is_edf
    from calypso.tasks.raw.tiff import is_tiff, tiff_layout

    if is_tiff(file) and needed > 1:
        return tiff_layout(file)[0]
    if not is_edf(file):
        return None
    status = file.stat()
    try:
        return edf_look(file, status.st_size, status.st_ino)[0]
    except OSError:  # not even its first header is whole
        return 0


def _external_problems(path: Path, dset: h5py.Dataset) -> list[str]:
    """The files of a dataset stored in other files (HDF5 external storage: the Lima EDF
    files a Bliss dataset file describes, a segment a frame) that are missing or shorter
    than the frames need: HDF5 reads what is not there as zeros, without an error."""
    from calypso.registry.access.links import link_targets

    needed: dict[str, int] = {}  # bytes each file must hold
    for name, offset, size in dset.external or ():
        end = offset if size == h5py.h5f.UNLIMITED else offset + size
        needed[name] = max(needed.get(name, 0), end)
    problems = []
    for name, end in needed.items():
        # Found where HDF5 finds it (calypso sets HDF5_EXTFILE_PREFIX=${ORIGIN}).
        file = link_targets((path,), "HDF5_EXTFILE_PREFIX", name)[0]
        try:
            held = file.stat().st_size
        except OSError:
            problems.append(f"{file} is missing")
            continue
        if held < end:
            problems.append(
                f"{file} holds {held} bytes, the frames stored there need {end} "
                "(truncated, or still being written)"
            )
    return sorted(problems)


def virtual_source_path(path: Path, file_name: str) -> Path:
    """The file a mapping of the virtual dataset in ``path`` names: ``.`` for ``path``
    itself, a relative name from ``path``'s folder (as HDF5 resolves it)."""
    if file_name == ".":
        return path
    source = Path(file_name)
    return source if source.is_absolute() else path.parent / source


def _selection(
    source: h5py.h5s.SpaceID, virtual: h5py.h5s.SpaceID
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a VDS mapping starts in its source and how many elements it takes, per axis.

    A mapping of a whole source ("all" selection) takes as many elements as its block
    in the virtual dataset: as many frames as the block's bounds span, or, for a block
    strided along the frames (every other frame from each of two files), as it selects.
    """
    if source.get_select_type() == h5py.h5s.SEL_ALL:
        start, stop = virtual.get_select_bounds()
        extent = [int(b) - int(a) + 1 for a, b in zip(start, stop, strict=True)]
        spanned = int(np.prod(extent, dtype=np.int64))
        if spanned and virtual.get_select_npoints() != spanned:
            extent[0] = virtual.get_select_npoints() * extent[0] // spanned
        return (0,) * len(extent), tuple(extent)
    start, stop = source.get_select_bounds()
    return tuple(int(a) for a in start), tuple(
        int(b) - int(a) + 1 for a, b in zip(start, stop, strict=True)
    )


def _source_dataset(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype] | str:
    """Shape and type of the source dataset, or what is wrong with it (following external
    links, as Eiger masters chain a VDS to links to the data files)."""
    if not path.exists():
        return f"{path} is missing"
    try:
        with h5py.File(path, "r", locking=False) as h5:
            link = h5.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                target = Path(link.filename)
                target = target if target.is_absolute() else path.parent / target
                return _source_dataset(target, link.path)
            if name not in h5:
                return f"{path} has no dataset {name}"
            return tuple(h5[name].shape), h5[name].dtype
    except (OSError, KeyError) as exc:
        return f"{path}::{name} cannot be read ({exc})"


def require_frames(path: str | Path, dataset: str) -> None:
    """Raise :class:`RawDataError` unless every frame of ``dataset`` is backed by data of the
    virtual dataset's own type and frame size."""
    missing, mismatched = _source_problems(path, dataset)
    if missing:
        raise RawDataError(
            f"{path}::{dataset} refers to detector files that are missing or incomplete: "
            f"{_some(missing)}. Copy the Lima files next to the dataset file (or wait for the "
            "scan to finish) and run again; missing frames are never read as zeros."
        )
    if mismatched:
        raise RawDataError(
            f"{path}::{dataset} does not match its detector files: {_some(mismatched)}. "
            "Check that these files belong to this scan, or rewrite the virtual dataset with "
            "their type and frame size."
        )


def _some(problems: list[str], shown: int = 3) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


def read_counter(path: str | Path, scan: int, name: str, start: int = 0, stop: int | None = None):
    """Values of a counter (``N.1/measurement/<name>``) for frames ``start:stop``."""
    with open_raw(path) as h5:
        location = f"{scan}.1/measurement/{name}"
        if location not in h5:
            available = sorted(h5.get(f"{scan}.1/measurement", {}).keys())
            raise RawDataError(
                f"{path}: scan {scan} has no counter {name!r}; available: {', '.join(available)}"
            )
        return np.asarray(h5[location][start:stop], dtype=np.float64)
