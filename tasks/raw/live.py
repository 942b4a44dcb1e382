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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import h5py
import numpy as np

from calypso.errors import ParameterError, RawDataError
from calypso.registry.access.links import as_text, first_reference, referenced_file
from calypso.tasks.raw.lima_saving import (
    LIMA_DATASET,
    complete_frames,
    edf_first_frame,
    edf_frames,
    frames_dataset,
    image_frames,
    is_edf,
    is_image,
    open_lima,
    read_run,
    require_followed,
)


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
    """The frames of :meth:`LiveScan.locations` runs, in order (in a task, on a worker),
    all of the first's shape (one image a file: any file may be another's)."""
    blocks = [read_run(*run) for run in runs]
    for run, block in zip(runs, blocks, strict=True):
        if block.shape[1:] != blocks[0].shape[1:]:
            raise RawDataError(
                f"{run[0]} holds frames of shape {block.shape[1:]}, {runs[0][0]} of "
                f"{blocks[0].shape[1:]}: one belongs to another detector or scan"
            )
    return np.concatenate(blocks)


def follow(
    scan: LiveScan, poll: float = 0.1, sleep: Callable[[float], None] = time.sleep
) -> Iterator[tuple[int, int]]:
    """Every frame range of ``scan`` as it becomes ready, until the scan's end."""
    while True:
        yield from scan.ready()
        if scan.finished:
            return
        sleep(poll)


def _counter(item: object) -> bool:
    """A counter of the dataset file: one number a point (a detector whose images are
    named frame by frame, CBF or TIFF, is one string a point)."""
    return isinstance(item, h5py.Dataset) and item.ndim == 1 and item.dtype.kind in "biuf"


def _stalled(what: str, waited: float, ended: bool = False) -> RawDataError:
    state = "the scan ended without them" if ended else "the scan has not ended"
    return RawDataError(
        f"{what}, and nothing new came for {waited:.0f} s although {state}: the detector "
        "or its writer stopped. Reduce what was handed out, or rerun offline once the "
        "files are complete."
    )


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
        self._first_frame: int | None = None  # of the first EDF file found (acq_frame_nb)
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
        named = None
        try:
            with h5py.File(self.dataset_file, "r", locking=False) as h5:
                if entry not in h5 or "end_time" not in h5[entry]:
                    return
                title = h5[entry].get("title")
                name = as_text(title[()]) if isinstance(title, h5py.Dataset) else ""
                recorded = h5.get(f"{entry}/instrument/{detector}/data") if detector else None
                if isinstance(recorded, h5py.Dataset):
                    self._end = recorded.shape[0]
                    named = first_reference(recorded)
        except (OSError, KeyError, ValueError, RuntimeError):
            return  # the writer is between two flushes: look again next time
        if named and self._handed:
            self._check_first_file(referenced_file(self.dataset_file, named))
        self._ended = True
        self._info = LiveScanInfo(self._info.number, name, self._npoints, self._info.detectors)

    def _check_first_file(self, named: Path) -> None:
        """The scan's first frame is where the dataset file says (CBF, TIFF files named
        frame by frame): an image says not which frame it is, and a later file whole
        before the first one appeared would have been taken for it."""
        followed = Path(self._path(0))
        same = named.exists() and followed.exists() and os.path.samefile(named, followed)
        if not same:
            raise RawDataError(
                f"the dataset file {self.dataset_file} names {named} as the scan's first "
                f"frame, {followed} was read as it: the frames read while the scan ran are "
                "not the scan's; reduce it offline (calypso run TECHNIQUE RAW)"
            )

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
        require_followed(path)  # a CBF, TIFF ... saving: named now, not after a stall
        final = self._ended or os.path.exists(self._path(index + 1))
        try:
            if is_image(path):  # one image a file (CBF, TIFF): whole once every byte is
                # Lima's saving tasks may open file 1 before file 0, and an image says not
                # which frame it is: the lowest number is looked for until frame 0 is out.
                relist = index == 0 and self._handed == 0 and self._find_files is not None
                found = self._find_files() if relist else None
                if found and found != (self.template, self.first_file):
                    self.template, self.first_file = found
                    return "missing"
                return (*image_frames(path), final)
            if is_edf(path):  # frames whose header and pixels are all on disk
                if index == 0 and self._current == 0 and self._find_files is not None:
                    # The first file found may not be the first: Lima's saving tasks write
                    # one frame a file in parallel. An EDF frame says which it is (Lima's
                    # acq_frame_nb, from 0): until frame 0's file comes, look again.
                    self._first_frame = edf_first_frame(path)
                    if self._first_frame not in (0, None):
                        if found := self._find_files():
                            self.template, self.first_file = found
                        return "missing"
                return (*edf_frames(path), final)
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
            if count < self._current:
                raise RawDataError(
                    f"{self._path(index)} held {self._current} complete frames, now {count}: "
                    "the Lima file was rewritten or replaced while the scan ran"
                )
            self._handed += count - self._current
            self._current = count
            if not final or (count < total and not self._ended):
                break  # more to come in this file
            later = os.path.exists(self._path(index + 1))
            if self._end is not None and self._handed < self._end and (count < total or not later):
                # The scan has ended and recorded more frames than are wholly on disk: the
                # last ones are still to land in this file (Lima closes its file after
                # Bliss writes end_time; an EDF file says nothing of the frames to come).
                # Read this file again, not the next one.
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
        if self._first_frame not in (0, None):
            what = (
                f"the first Lima file found, {path}, starts at frame {self._first_frame} of the "
                "scan (acq_frame_nb), and the file of frame 0 did not appear"
            )
        elif not os.path.exists(path):
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
                    if _counter(item) and len(item) >= stop:
                        counters[name] = np.asarray(item[first:stop], dtype=np.float64)
        except (OSError, KeyError, ValueError, RuntimeError):
            return {}  # caught between two metadata writes: look again next time
        return counters

    def close(self) -> None:
        """Nothing stays open between two looks."""
