"""The spectra of an XAS map in progress, as a live run follows them (docs/live.md).

A Bliss XAS map has no detector frames: its points are spectra, the rows of its 2D
counters (``N.1/measurement/i0``, ``it``, ...: spectrum x energy point), its energy axis a
1D counter written when the scan starts. :class:`CounterRows` is the
:class:`~calypso.tasks.raw.live.LiveScan` of such a scan, read from the growing dataset
file: **a point is available once every 2D counter of the entry holds its row** (the
writer grows each counter a whole row at a time and flushes it, under SWMR), and the
energy axis is there. The scan's end is ``end_time`` in entry ``N.1`` (written last).

:class:`StreamRows` follows the same scan through Bliss's data streams (blissdata): a
row a point of each 2D counter's stream, read from the streams, which the file may lag.
Either gives a live chunk's counters as the offline reader would
(:meth:`CounterRows.table`); the offline readers do not open a file its writer holds in
SWMR mode.

A map scanned an energy at a time (its 2D counters an energy point a row, the energy a
per-point counter: every spectrum grows together) has no whole spectrum before its end:
its energy points are followed (the stall time-out counts from the last one) and every
spectrum is handed out once ``end_time`` is written (:attr:`CounterRows.whole_at_end`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calypso.errors import RawDataError
from calypso.tasks.raw import bliss
from calypso.tasks.raw.lima_saving import open_lima
from calypso.tasks.raw.live import FileRun, LiveScanInfo, _stalled
from calypso.tasks.raw.live_streams import BlissdataScan
from calypso.tasks.raw.spectra import ColumnTable, counter_spectra, energy_point_rows


class CounterRows:
    """The spectra of a map scan in progress (rows of its 2D counters), from the Bliss
    dataset file as it grows: a :class:`~calypso.tasks.raw.live.LiveScan`."""

    def __init__(
        self,
        dataset_file: str | Path,
        scan: int,
        stall_timeout: float = 60.0,
        skip: int = 0,
        energy: str | None = None,
    ) -> None:
        self.dataset_file = Path(dataset_file)
        self.entry = f"{scan}.1"
        self.stall_timeout = stall_timeout
        self.energy = energy  # the energy counter asked for (None: the usual names)
        self._info = LiveScanInfo(scan, "", None)
        self._handed = skip  # handed out already (by the stream this follows on from)
        self._ended = False
        self._progress = time.monotonic()
        self.energy_rows: bool | None = None  # the layout, once the file tells it
        self._points = 0  # energy points written, when an energy point is a row
        self._energy_name: str | None = None  # the energy counter, once the layout is told

    @property
    def whole_at_end(self) -> bool:
        """A map scanned an energy at a time: its spectra are handed out at its end."""
        return bool(self.energy_rows)

    @property
    def energy_points(self) -> int:
        """The energy points written so far of a map scanned an energy at a time."""
        return self._points

    def energy_points_table(self, most_spectra: int) -> ColumnTable:
        """The counters of the energy points written so far of a map scanned an energy at a
        time, of at most ``most_spectra`` of its spectra spread evenly over it: what a look
        at the map in progress shows (:func:`read_energy_points`)."""
        return read_energy_points(
            self.dataset_file, self._info.number or 0, self._points, most_spectra
        )

    @property
    def info(self) -> LiveScanInfo:
        return self._info

    @property
    def frames(self) -> int:
        return self._handed

    @property
    def finished(self) -> bool:
        return self._ended

    partial = False  # the end reason is read from the file (live._end_reason)

    def _look(self) -> tuple[int, bool] | None:
        """(rows every 2D counter holds, end_time written), None while the file or the
        entry cannot be read (not there yet, caught between two metadata writes)."""
        try:
            with open_lima(self.dataset_file) as h5:
                entry = h5.get(self.entry)
                if entry is None:
                    return None
                ended = "end_time" in entry  # read first: the rows then hold all there is
                measurement = entry.get("measurement")
                stacks = _stacks(measurement)
                counters = list(stacks)
                rows = [shape[0] for shape in stacks.values()]
                axis = next(iter(stacks.values()))[1] if stacks else 0
                if counters and not self._info.counters:
                    self._info = LiveScanInfo(
                        self._info.number, bliss._optional_text(entry, "title") or "", None,
                        (counters[0],), tuple(counters),
                    )  # fmt: skip
                if rows and min(rows) and self.energy_rows is None:  # told by a point
                    self.energy_rows = self._layout(measurement, min(rows), axis, ended)
                if self.energy_rows:  # every spectrum whole at the end only
                    energy = measurement.get(self._energy_name or "")
                    self._points = min(min(rows), getattr(energy, "shape", (0,))[0])
                    return (axis if ended else 0), ended
                # The energy axis (a 1D counter of the rows' length) must be there too.
                axes = [
                    n for n in measurement or ()
                    if isinstance(measurement.get(n), h5py.Dataset)
                    and measurement[n].ndim == 1 and measurement[n].shape[0] == axis
                ]  # fmt: skip
                return (min(rows) if rows and axes else 0), ended
        except (OSError, KeyError, ValueError, RuntimeError):
            return None

    def _layout(self, measurement: h5py.Group, rows: int, axis: int, ended: bool) -> bool | None:
        """An energy point a row (True), a spectrum a row (False, also without an energy
        counter to tell), or None until the file tells."""
        names = [n for n in measurement if getattr(measurement.get(n), "ndim", 0) == 1]
        table = ColumnTable(where=str(self.dataset_file), columns=dict.fromkeys(names))
        try:
            energy = table.find(self.energy, "energy", required=False)
        except RawDataError:  # not written yet
            return None
        if energy is None:
            return False
        self._energy_name = energy
        return energy_point_rows(measurement[energy].shape[0], rows, axis, final=ended)

    def ready(self) -> list[tuple[int, int]]:
        points = self._points
        look = self._look()
        if self._points > points:  # a map scanned an energy at a time goes on
            self._progress = time.monotonic()
        if look is None:
            self._check_stall()
            return []
        rows, ended = look
        start = self._handed
        self._handed = max(self._handed, rows)
        self._ended = ended
        if self._handed > start:
            self._progress = time.monotonic()
            return [(start, self._handed)]
        self._check_stall()
        return []

    def _check_stall(self) -> None:
        waited = time.monotonic() - self._progress
        if self._ended or waited <= self.stall_timeout:
            return
        counters = ", ".join(self._info.counters) or "its 2D counters"
        held = f"{self._points} energy points" if self.energy_rows else f"{self._handed} spectra"
        what = f"{self.dataset_file} scan {self._info.number}: {counters} held {held}"
        raise _stalled(what, waited)

    def locations(self, first: int, stop: int) -> list[FileRun]:
        """The rows of the first 2D counter (the frame shape: a spectrum's points)."""
        if not 0 <= first < stop <= self._handed:
            raise RawDataError(
                f"spectra {first}-{stop - 1} of {self.dataset_file} scan {self._info.number} "
                f"are not all handed out yet ({self._handed} are)"
            )
        counter = self._info.counters[0]
        return [(str(self.dataset_file), f"/{self.entry}/measurement/{counter}", first, stop)]

    def read(self, first: int, stop: int) -> np.ndarray:
        with open_lima(self.dataset_file) as h5:
            return h5[self.locations(first, stop)[0][1]][first:stop]

    def read_counters(self, first: int, stop: int) -> dict[str, np.ndarray]:
        return {n: v for n, v in self.table(first, stop).columns.items() if v.ndim == 2}

    def table(self, first: int, stop: int) -> ColumnTable:
        """What a live chunk reduces: spectra ``first:stop`` and the energy axis. Spectra
        handed out by the stream this follows on from (``skip``) may not be in the file
        yet: waited for, up to the stall time-out."""
        began = time.monotonic()
        while (self._look() or (0, False))[0] < stop:
            if time.monotonic() - began > self.stall_timeout:
                what = f"{self.dataset_file} scan {self._info.number}: spectrum {stop - 1}"
                raise _stalled(what, time.monotonic() - began)
            time.sleep(0.05)
        return read_live_counters(
            self.dataset_file, self._info.number or 0, first, stop, bool(self.energy_rows)
        )

    def close(self) -> None:
        """Nothing stays open between two looks."""


class StreamRows(BlissdataScan):
    """The spectra of a map scan in progress from Bliss's data streams (blissdata): one
    stream a 2D counter of the file, a row (a spectrum) a point, as Bliss publishes its 1D
    detectors. A spectrum is handed out once every such stream has it, and read from the
    streams: the dataset file may lag them. The energy axis and the edge's metadata, written
    when the scan starts, are read from the file, which must hold the counters' datasets
    before the first spectrum is handed out. The server gone: :meth:`as_files`. A map
    scanned an energy at a time is followed in its file (:class:`CounterRows`): its
    spectra are whole only at its end, when the file has them all."""

    def __init__(
        self,
        url: str,
        key: str,
        dataset_file: str | Path,
        stall_timeout: float = 60.0,
        energy: str | None = None,
    ) -> None:
        super().__init__(url, key, stall_timeout=stall_timeout)
        self.dataset_file = Path(dataset_file)
        self._file_ready = False
        self._layout = CounterRows(dataset_file, self._scan.number, stall_timeout, energy=energy)
        self._files: CounterRows | None = None  # an energy point a row: the file followed

    @property
    def whole_at_end(self) -> bool:
        return self._files is not None

    @property
    def energy_points(self) -> int:
        return 0 if self._files is None else self._files.energy_points

    def energy_points_table(self, most_spectra: int) -> ColumnTable:
        if self._files is None:
            raise RawDataError(f"{self.dataset_file}: not a map scanned an energy at a time")
        return self._files.energy_points_table(most_spectra)

    def ready(self) -> list[tuple[int, int]]:
        if self._files is None and self._layout.energy_rows is None:
            self._layout._look()  # the file tells the layout at its first point
            if self._layout.energy_rows:
                self._files = self._layout
        if self._files is not None:
            return self._files.ready()
        return super().ready()

    @property
    def frames(self) -> int:
        return self._handed if self._files is None else self._files.frames

    @property
    def partial(self) -> bool:
        return super().partial if self._files is None else self._files.partial

    def _rows(self) -> dict[str, Any]:
        """The counters' streams whose points are rows, by the file's counter name (Bliss
        names a stream ``controller:counter``)."""
        return {
            name.split(":")[-1]: stream
            for name, stream in self._scan.streams.items()
            if stream.plugin is None and stream.kind == "array" and len(stream.shape) == 1
        }

    def _spectra(self) -> dict[str, Any]:
        """The streams of the spectra's counters: those of the commonest width (an MCA a
        point is a row too, of its channels: no spectrum, its width no spectrum's)."""
        rows = self._rows()
        widths = [tuple(stream.shape) for stream in rows.values()]
        width = max(set(widths), key=widths.count) if widths else None
        return {name: stream for name, stream in rows.items() if tuple(stream.shape) == width}

    @property
    def info(self) -> LiveScanInfo:
        if self._files is not None:  # its file's 2D counters (no stream need be loaded)
            return self._files.info
        rows = tuple(self._spectra())
        return LiveScanInfo(
            self._scan.number, self._scan.info.get("title") or self._scan.name,
            self._scan.info.get("npoints"), rows[:1], rows,
        )  # fmt: skip

    @property
    def finished(self) -> bool:
        from blissdata.redis_engine.scan import ScanState

        if self._files is not None:
            return self._files.finished
        closed = self._scan.state >= ScanState.CLOSED
        return closed and self._handed >= min(map(len, self._rows().values()), default=0)

    points = "spectra"

    def _available(self) -> tuple[int, bool]:
        """Spectra every row stream has, once the file holds the counters and the axis."""
        changed = False
        while self._scan.update(block=False):
            changed = True
        rows = self._rows()
        available = min(map(len, rows.values()), default=0)
        if available and not self._file_ready:
            self._file_ready = self._file_holds(rows)
        return (available if self._file_ready else 0), changed

    def _file_holds(self, rows: dict[str, Any]) -> bool:
        """The dataset file has the entry, a dataset for every streamed counter and the
        energy axis (a 1D counter of a row's length)."""
        try:
            with open_lima(self.dataset_file) as h5:
                measurement = h5.get(f"{self._scan.number}.1/measurement")
                if measurement is None or any(name not in measurement for name in rows):
                    return False
                length = next(iter(self._spectra().values())).shape[0]
                return any(
                    getattr(measurement.get(n), "shape", None) == (length,) for n in measurement
                )
        except (OSError, KeyError, ValueError, RuntimeError):
            return False

    def locations(self, first: int, stop: int) -> list[FileRun]:
        """Where the file keeps the first streamed counter (its rows: the frame shape)."""
        if self._files is not None:
            return self._files.locations(first, stop)
        counter = self.info.counters[0]
        return [
            (str(self.dataset_file), f"/{self._scan.number}.1/measurement/{counter}", first, stop)
        ]

    def read(self, first: int, stop: int) -> np.ndarray:
        return self.read_counters(first, stop)[self.info.counters[0]]

    def read_counters(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``first:stop`` of every streamed 2D counter."""
        if self._files is not None:
            return self._files.read_counters(first, stop)
        with self._server_gone_named():
            return {
                name: np.asarray(stream[first:stop], dtype=np.float64)
                for name, stream in self._rows().items()
            }

    def table(self, first: int, stop: int) -> ColumnTable:
        """Spectra ``first:stop`` from the streams, the energy axis and the edge from the
        file: the table the file gives once it has caught up."""
        if self._files is not None:
            return self._files.table(first, stop)
        header = read_live_counters(self.dataset_file, self._scan.number, 0, 0)
        rows = self.read_counters(first, stop)
        missing = [n for n, v in header.columns.items() if v.ndim == 2 and n not in rows]
        if missing:
            raise RawDataError(
                f"{self.dataset_file} scan {self._scan.number}: the 2D counters "
                f"{', '.join(missing)} have no stream on {self.url}: read the files instead "
                "(--live files)"
            )
        columns = {n: rows.get(n, v) for n, v in header.columns.items()}
        return ColumnTable(where=header.where, columns=columns, metadata=header.metadata)

    def as_files(self) -> CounterRows:
        """The same map's remaining spectra from its dataset file (the server went away):
        those handed out already are not handed out again."""
        if self._files is not None:
            return self._files
        return CounterRows(
            self.dataset_file, self._scan.number, self.stall_timeout, self._handed,
            self._layout.energy,
        )  # fmt: skip


def _stacks(measurement: h5py.Group | None) -> dict[str, tuple[int, int]]:
    """The map's 2D counters and their shapes: those of the one width among them (a
    spectrum's points, or the map's spectra when an energy point is a row) that a 1D
    counter has too, else the commonest. A 2D counter of another width (an MCA's
    channels a point) is no spectrum: its width once stood for the spectrum's, and the
    map was never followed."""
    shapes: dict[str, tuple[int, int]] = {}
    lengths: set[int] = set()
    for name in measurement or ():
        item = measurement.get(name)
        if isinstance(item, h5py.Dataset) and item.ndim == 2:
            shapes[name] = item.shape
        elif isinstance(item, h5py.Dataset) and item.ndim == 1:
            lengths.add(item.shape[0])
    widths = [shape[1] for shape in shapes.values()]
    told = [width for width in widths if width in lengths] or widths
    if not told:
        return {}
    width = max(set(told), key=told.count)
    return {name: shape for name, shape in shapes.items() if shape[1] == width}


def read_live_counters(
    path: str | Path, scan: int, start: int, stop: int, energy_rows: bool = False
) -> ColumnTable:
    """The counters of spectra ``start:stop`` (rows of the 2D counters, or their columns
    with ``energy_rows``; 1D counters whole) and the edge metadata, as
    :func:`calypso.tasks.raw.spectra.read_bliss_counters` reads them offline, from a
    dataset file its writer may still hold (SWMR, no locking)."""

    def take(name: str, item: Any) -> np.ndarray | None:
        if getattr(item, "ndim", 0) == 1:
            return np.asarray(item[()], dtype=np.float64)
        if getattr(item, "ndim", 0) != 2:
            return None
        if item.shape[int(energy_rows)] < stop:  # never fewer spectra than asked
            raise KeyError(f"{name} holds {item.shape[int(energy_rows)]} spectra")
        return counter_spectra(item, start, stop, energy_rows)

    return _read_counters(path, scan, f"the counters of spectra {start}-{stop - 1}", take)


def read_energy_points(path: str | Path, scan: int, points: int, most_spectra: int) -> ColumnTable:
    """The counters of a map scanned an energy at a time over its first ``points`` energy
    points, of at most ``most_spectra`` spectra spread evenly over the map (the 2D
    counters' columns, as spectra; the 1D counters cut to ``points``), and the edge metadata:
    a look at the map while it is scanned, whatever its size, from its dataset file as it
    grows (SWMR, no locking)."""

    def take(name: str, item: Any) -> np.ndarray | None:
        if getattr(item, "ndim", 0) == 1:
            return np.asarray(item[: min(points, item.shape[0])], np.float64)
        if getattr(item, "ndim", 0) != 2:
            return None
        if item.shape[0] < points:
            raise KeyError(f"{name} holds {item.shape[0]} energy points")
        every = -(-item.shape[1] // max(most_spectra, 1))  # ceiling
        # Whole rows a block at a time, then one spectrum in ``every``: 3x faster than
        # h5py's strided selection (10^4 spectra, 415 points).
        blocks = [item[row : min(row + 64, points)][:, ::every] for row in range(0, points, 64)]
        return np.ascontiguousarray(np.concatenate(blocks).astype(np.float64).T)

    return _read_counters(path, scan, f"the counters of its first {points} energy points", take)


def _read_counters(
    path: str | Path, scan: int, what: str, take: Callable[[str, Any], np.ndarray | None]
) -> ColumnTable:
    """Scan ``scan``'s counters as ``take(name, dataset)`` reads each (None: left out) and
    its edge metadata, from a dataset file its writer may still hold; a failure names
    ``what``."""
    entry = f"{scan}.1"
    try:
        with open_lima(path) as h5:
            measurement = h5[f"{entry}/measurement"]
            columns: dict[str, np.ndarray] = {}
            for name in measurement:
                values = take(name, measurement.get(name))
                if values is not None:
                    columns[name] = values
            metadata = _edge_metadata(h5, entry)
    except (OSError, KeyError, ValueError) as exc:
        raise RawDataError(f"{path} scan {scan}: {what} cannot be read ({exc})") from None
    return ColumnTable(where=f"{path} scan {scan}", columns=columns, metadata=metadata)


def _edge_metadata(h5: h5py.File, entry: str) -> dict[str, str]:
    """The edge a Bliss XAS scan names (``instrument/xas/{element,edge}``), as XDI keys."""
    metadata = {}
    for name, key in (("element", "Element.symbol"), ("edge", "Element.edge")):
        if f"{entry}/instrument/xas/{name}" in h5:
            metadata[key] = bliss._text(h5[f"{entry}/instrument/xas/{name}"][()])
    return metadata
