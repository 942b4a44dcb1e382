"""Frames of a scan in progress, as they become wholly available (docs/live.md).

Two sources behind one small interface, :class:`LiveScan`:

- :class:`BlissdataScan` follows a scan through Bliss's data streams (``blissdata`` on
  its Redis/valkey server): scan info, counters and, for a Lima detector, which Lima
  file holds each frame. A frame counts once Lima has closed the file holding it (the
  rule blissdata itself uses to read from files), so it is never half-written.
- :class:`LimaFiles` watches the Lima HDF5 files themselves, for setups without
  blissdata: a frame counts once its chunk is stored in the file (HDF5's chunk index),
  whatever the dataset's shape already says; files are re-opened at each look, with
  file locking off, and read in SWMR mode where the writer uses it.

Both hand out each frame exactly once, as ``(first, stop)`` ranges in scan order, and
raise :class:`~calypso.errors.RawDataError` naming the file or stream when the writer
stops without ending the scan (``stall_timeout``) or the stream vanishes.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle, LZ4 ... with HDF5)
import numpy as np

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw.stored_chunks import read_dataset_frames

LIMA_DATASET = "/entry_0000/measurement/data"


@dataclass(frozen=True)
class LiveScanInfo:
    """What is known of a scan in progress."""

    number: int | None
    name: str  # the scan's title (``amesh sy 0 1 4 sz 0 1 2 0.1``), else its name
    npoints: int | None
    detectors: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()


@runtime_checkable
class LiveScan(Protocol):
    """A scan in progress whose frames are handed out as they become wholly available."""

    @property
    def info(self) -> LiveScanInfo: ...

    @property
    def finished(self) -> bool:
        """The end is known and every frame has been handed out by :meth:`ready`."""
        ...

    @property
    def frames(self) -> int:
        """How many frames :meth:`ready` has handed out (always a prefix of the scan)."""
        ...

    def ready(self) -> list[tuple[int, int]]:
        """The frame ranges newly wholly available since the last call (never blocks)."""
        ...

    def read(self, first: int, stop: int) -> np.ndarray:
        """Frames ``first`` to ``stop - 1``, all of them already handed out."""
        ...

    def locations(self, first: int, stop: int) -> list[FileRun]:
        """Where frames ``first`` to ``stop - 1`` (handed out) lie: ``(file, dataset, index,
        stop index)`` runs, small enough to send to a task that reads them itself."""
        ...

    def read_counters(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """Points ``first`` to ``stop - 1`` of every counter that has them all so far."""
        ...

    def close(self) -> None: ...


FileRun = tuple[str, str, int, int]  # Lima file, dataset, first index, stop index


def counter_named(counters: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """Counter ``name`` among a live scan's counters: streams are named by their
    controller too (``axis:srot``, ``simulator:mon``), files by the counter alone."""
    for counter, values in counters.items():
        if counter == name or counter.split(":")[-1] == name:
            return values
    return None


def read_runs(runs: list[FileRun]) -> np.ndarray:
    """The frames of :meth:`LiveScan.locations` runs, in order (in a task, on a worker)."""
    return np.concatenate([read_lima(*run) for run in runs])


def follow(
    scan: LiveScan, poll: float = 0.1, sleep: Callable[[float], None] = time.sleep
) -> Iterator[tuple[int, int]]:
    """Every frame range of ``scan`` as it becomes ready, until the scan's end."""
    while True:
        yield from scan.ready()
        if scan.finished:
            return
        sleep(poll)


# -- reading Lima HDF5 files without locking ---------------------------------------


# A Lima file: <prefix><number>.h5, the number padded or not (saving_index_format).
_LIMA_FILE = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)\.(?P<suffix>h5|hdf5|nxs)$")


def lima_namings(scan_folder: Path) -> dict[str, tuple[str, int]]:
    """The Lima files in a scan's folder, by the detector their prefix names
    (``pilatus1m_0000.h5`` -> ``pilatus1m``): the template of their names (``%04d`` as
    their numbers are padded) and the first number. Lima's saving prefix, index format
    and first number are the beamline's: ``<det>_0000.h5`` is Bliss's default only."""
    numbers: dict[tuple[str, str], list[str]] = {}
    try:
        names = os.listdir(scan_folder)
    except OSError:
        return {}
    for name in names:
        if match := _LIMA_FILE.match(name):
            key = (match["prefix"], match["suffix"])
            numbers.setdefault(key, []).append(match["number"])
    namings = {}
    for (prefix, suffix), found in sorted(numbers.items()):
        first = min(found, key=int)
        template = str(scan_folder / f"{prefix}%0{len(first)}d.{suffix}")
        namings[prefix.rstrip("_-.") or prefix] = (template, int(first))
    return namings


def lima_detectors(dataset_dir: Path, number: int) -> tuple[str, ...]:
    """The detectors with Lima files in scan ``number``'s folder
    (:func:`lima_namings`): what names them while the dataset file may not say so yet."""
    return tuple(sorted(lima_namings(dataset_dir / f"scan{number:04d}")))


def frames_dataset(h5: h5py.File, detectors: tuple[str, ...] = ()) -> str | None:
    """The frames of a Lima file without the ``measurement/data`` link: the detector's
    ``entry_0000/<instrument>/<detector>/data`` (``ESRF-ID00``, ``instrument``), else the
    one stack of frames in ``entry_0000``; None while there is none yet."""
    entry = h5.get("entry_0000")
    if not isinstance(entry, h5py.Group):
        return None
    for group in entry:
        for detector in detectors:
            data = entry.get(f"{group}/{detector}/data")
            if isinstance(data, h5py.Dataset) and data.ndim >= 3:
                return data.name
    stacks: list[str] = []
    entry.visititems(
        lambda name, item: (
            stacks.append(item.name)
            if isinstance(item, h5py.Dataset) and item.ndim >= 3 and name.endswith("data")
            else None
        )
    )
    return stacks[0] if len(stacks) == 1 else None


def lima_files(raw_dataset_dir: str | Path, scan: int, detector: str) -> tuple[str, int] | None:
    """The template and first number of ``detector``'s Lima files in a scan's folder (a
    prefix that starts with its name too: ``pilatus1m_CeO2_0000.h5``); None while there
    is none."""
    namings = lima_namings(Path(raw_dataset_dir) / f"scan{scan:04d}")
    if detector in namings:
        return namings[detector]
    started = [n for n in namings if n.startswith(detector)]
    return namings[started[0]] if len(started) == 1 else None


def open_lima(path: str | Path) -> h5py.File:
    """Open a file of a scan in progress: one the acquisition wrote there
    (:func:`_written_here`), read as :func:`open_growing` does."""
    _written_here(Path(path))
    return open_growing(path)


def open_growing(path: str | Path) -> h5py.File:
    """Open an HDF5 file another process may still write: no file locking, SWMR read
    where the file allows it. ``OSError`` when it cannot be opened (yet): HDF5 reports a
    header caught half written as a RuntimeError ("bad object header version number")."""
    try:
        return h5py.File(path, "r", locking=False, swmr=True)
    except (OSError, RuntimeError):
        try:
            return h5py.File(path, "r", locking=False)
        except RuntimeError as exc:
            raise OSError(f"{path} cannot be opened (yet): {exc}") from None


def _written_here(path: Path) -> None:
    """Refuse a file of a scan in progress that is a symlink, has a second name (a hard
    link), or lies in a scan folder that is a symlink: the run was checked as the scan
    began, and a file appearing later by another name could be another proposal's (a
    service reads with rights the proposal's members do not have)."""
    try:
        status = os.lstat(path)
    except OSError:
        return  # not there yet: opening it says so
    folder = path.parent
    swapped = folder.name.startswith("scan") and folder.is_symlink()
    if stat.S_ISLNK(status.st_mode) or status.st_nlink > 1 or swapped:
        what = (
            "is a symlink" if stat.S_ISLNK(status.st_mode)
            else f"has {status.st_nlink} names (hard links)" if status.st_nlink > 1
            else "is in a scan folder that is a symlink"
        )  # fmt: skip
        raise RawDataError(
            f"{path} {what}: a live scan reads only the files its acquisition writes there"
        )


def read_lima(path: str | Path, dataset: str, first: int, stop: int) -> np.ndarray:
    """Frames ``first`` to ``stop - 1`` of one Lima file, or a RawDataError naming it."""
    try:
        with open_lima(path) as h5:
            data = h5[dataset]
            if data.shape[0] < stop:
                raise RawDataError(
                    f"{path}::{dataset} holds {data.shape[0]} frames, frame {stop - 1} "
                    "was announced: the Lima file was truncated or replaced"
                )
            return read_dataset_frames(data, path, first, stop)
    except (OSError, KeyError) as exc:
        raise RawDataError(
            f"frames {first}-{stop - 1} of Lima file {path}::{dataset} cannot be read "
            f"({exc}); the file is announced as complete"
        ) from None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _stalled(what: str, waited: float, ended: bool = False) -> RawDataError:
    state = "the scan ended without them" if ended else "the scan has not ended"
    return RawDataError(
        f"{what}, and nothing new came for {waited:.0f} s although {state}: the detector "
        "or its writer stopped. Reduce what was handed out, or rerun offline once the "
        "files are complete."
    )


# -- growing Lima files --------------------------------------------------------------


def lima_template(raw_dataset_dir: str | Path, scan: int, detector: str) -> str:
    """Where Bliss has Lima write a scan's files: ``<dataset>/scanNNNN/<detector>_%04d.h5``."""
    return str(Path(raw_dataset_dir) / f"scan{scan:04d}" / f"{detector}_%04d.h5")


def complete_frames(data: h5py.Dataset, final: bool) -> int:
    """How many leading frames of ``data`` are wholly on disk.

    A chunked dataset: a frame counts once the chunk holding it is stored (and inside
    the dataset's current shape); a chunk of several frames only once the chunk after it
    is stored or the file is ``final`` (a writer fills a chunk frame by frame). A
    contiguous dataset says nothing of what is written: it counts only when final.
    """
    total = data.shape[0]
    if data.chunks is None:
        return total if final else 0
    per_chunk = data.chunks[0]
    rest = (0,) * (data.ndim - 1)

    def stored(chunk: int) -> bool:
        first = chunk * per_chunk
        if first >= total:
            return False
        return data.id.get_chunk_info_by_coord((first, *rest)).byte_offset is not None

    count = 0
    chunk = 0
    while count < total and stored(chunk):
        if per_chunk > 1 and not final and not stored(chunk + 1):
            break
        count = min(total, (chunk + 1) * per_chunk)
        chunk += 1
    return count


class LimaFiles:
    """Frames of Lima HDF5 files (``template % k``: ``pilatus_0000.h5``, ...) as they are
    written, for setups without blissdata.

    The end of the scan is known from ``npoints`` (the frames the scan takes) or from
    ``dataset_file`` (the Bliss dataset file: ``end_time`` in entry ``scan``.1 is written
    last); without either, :attr:`finished` never becomes true. A file counts as final
    once the next one exists or the scan has ended.
    """

    def __init__(
        self,
        template: str | Path,
        dataset: str = LIMA_DATASET,
        *,
        first_file: int = 0,
        npoints: int | None = None,
        dataset_file: str | Path | None = None,
        scan: int | None = None,
        detector: str = "",
        stall_timeout: float = 60.0,
        skip: int = 0,
        find_files: Callable[[], tuple[str, int] | None] | None = None,
    ) -> None:
        if "%" not in str(template):
            raise ParameterError(f"{template}: a Lima file template needs %d or %04d")
        if dataset_file is not None and scan is None:
            raise ParameterError(f"{dataset_file}: which scan? (scan=N reads entry N.1)")
        self.template = str(template)
        self.dataset = dataset
        self.first_file = first_file
        self.stall_timeout = stall_timeout
        self.dataset_file = Path(dataset_file) if dataset_file is not None else None
        self._info = LiveScanInfo(scan, "", npoints, (detector,) if detector else (), ())
        self._npoints = npoints
        self._skip = skip  # frames handed out before (by another source)
        # Where the files are, looked for again while none has come (their names are the
        # beamline's: the template is Bliss's default until the first one shows them).
        self._find_files = find_files
        self._files: list[tuple[str, int]] = []  # final files: (path, frames)
        self._current = 0  # frames of the current (not final) file handed out
        self._handed = 0
        self._end: int | None = None  # frames of the scan, once its end is seen
        self._ended = False
        self._progress = time.monotonic()

    @property
    def info(self) -> LiveScanInfo:
        return self._info

    @property
    def frames(self) -> int:
        return self._handed

    @property
    def finished(self) -> bool:
        end = self._end if self._end is not None else self._npoints
        return end is not None and self._handed >= end

    @property
    def partial(self) -> bool:
        """Finished with fewer frames than ``npoints`` (an aborted scan)."""
        return self.finished and self._npoints is not None and self._handed < self._npoints

    def _path(self, index: int) -> str:
        return self.template % (self.first_file + index)

    def _look_for_end(self) -> None:
        if self._npoints is not None and self._handed >= self._npoints:
            self._end = self._npoints
            self._ended = True
        if self._ended or self.dataset_file is None or not self.dataset_file.exists():
            return
        entry = f"{self._info.number}.1"
        detector = self._info.detectors[0] if self._info.detectors else None
        try:
            with h5py.File(self.dataset_file, "r", locking=False) as h5:
                if entry not in h5 or "end_time" not in h5[entry]:
                    return
                title = h5[entry].get("title")
                name = _text(title[()]) if isinstance(title, h5py.Dataset) else ""
                recorded = h5.get(f"{entry}/instrument/{detector}/data") if detector else None
                if isinstance(recorded, h5py.Dataset):
                    self._end = recorded.shape[0]
        except (OSError, KeyError, ValueError, RuntimeError):
            return  # the writer is between two flushes: look again next time
        self._ended = True
        self._info = LiveScanInfo(self._info.number, name, self._npoints, self._info.detectors)

    def _probe(self, index: int) -> tuple[int, int, bool] | str:
        """(complete frames, frames in the file, final) of file ``index``, or "missing" /
        "unreadable" (not flushed yet, or caught between two metadata writes)."""
        path = self._path(index)
        if not os.path.exists(path) and index == 0 and self._find_files is not None:
            found = self._find_files()
            if found is not None:
                self.template, self.first_file = found
                path = self._path(index)
        if not os.path.exists(path):
            return "missing"
        final = self._ended or os.path.exists(self._path(index + 1))
        try:
            with open_lima(path) as h5:
                data = h5.get(self.dataset)
                if data is None and self.dataset == LIMA_DATASET and index == 0:
                    # No measurement/data link: the frames where Lima put them.
                    self.dataset = frames_dataset(h5, self._info.detectors) or self.dataset
                    data = h5.get(self.dataset)
                if not isinstance(data, h5py.Dataset):
                    return "unreadable"
                if data.ndim < 2:
                    raise RawDataError(
                        f"{path}::{self.dataset} has shape {data.shape}: not a stack of frames"
                    )
                return complete_frames(data, final), data.shape[0], final
        except (OSError, KeyError, ValueError, RuntimeError):
            return "unreadable"

    def ready(self) -> list[tuple[int, int]]:
        self._look_for_end()
        start = self._handed
        while not self.finished:
            index = len(self._files)
            probe = self._probe(index)
            if isinstance(probe, str):
                if probe == "missing" and self._ended and self._end is None:
                    self._end = self._handed  # every file the scan wrote is read
                break
            count, total, final = probe
            self._handed += count - self._current
            self._current = count
            if not final or (count < total and not self._ended):
                break  # more to come in this file
            if count < total and self._end is not None and self._handed < self._end:
                # The scan has ended and its file records more frames than are wholly on
                # disk here: the last ones are still to land (Lima closes its file after
                # Bliss writes end_time). Read this file again, not the next one.
                break
            self._files.append((self._path(index), count))
            self._current = 0
            if count < total:  # the scan ended inside this file
                self._end = self._handed if self._end is None else self._end
                break
        if self._handed > start:
            self._progress = time.monotonic()
            first = max(start, self._skip)
            return [(first, self._handed)] if self._handed > first else []
        self._check_stall()
        return []

    def _check_stall(self) -> None:
        if self.finished:
            return
        waited = time.monotonic() - self._progress
        if waited <= self.stall_timeout:
            return
        path = self._path(len(self._files))
        if not os.path.exists(path):
            what = f"Lima file {path} did not appear ({self._handed} frames read before)"
        else:
            what = f"Lima file {path} has held {self._current} complete frames"
        if self._end is not None:
            what += f" ({self._handed} of the {self._end} frames the scan recorded)"
        raise _stalled(what, waited, self._ended)

    def locations(self, first: int, stop: int) -> list[FileRun]:
        if not 0 <= first < stop <= self._handed:
            raise ParameterError(
                f"frames {first}-{stop - 1} of {self.template} are not all handed out yet "
                f"({self._handed} are)"
            )
        runs = []
        offset = 0
        files = [*self._files, (self._path(len(self._files)), self._current)]
        for path, count in files:
            lo, hi = max(first, offset), min(stop, offset + count)
            if lo < hi:
                runs.append((path, self.dataset, lo - offset, hi - offset))
            offset += count
        return runs

    def read(self, first: int, stop: int) -> np.ndarray:
        return read_runs(self.locations(first, stop))

    def read_counters(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """Counters from the Bliss dataset file as it grows (``N.1/measurement/<name>``):
        those with points up to ``stop``; none while the file is between two writes."""
        if self.dataset_file is None or not self.dataset_file.exists():
            return {}
        counters = {}
        try:
            with open_lima(self.dataset_file) as h5:
                measurement = h5.get(f"{self._info.number}.1/measurement")
                for name in measurement or ():
                    item = measurement.get(name)
                    if isinstance(item, h5py.Dataset) and item.ndim == 1 and len(item) >= stop:
                        counters[name] = np.asarray(item[first:stop], dtype=np.float64)
        except (OSError, KeyError, ValueError, RuntimeError):
            return {}  # caught between two metadata writes: look again next time
        return counters

    def close(self) -> None:
        """Nothing stays open between two looks."""
