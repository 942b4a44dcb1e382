"""An acquisition simulator: a Bliss scan written frame by frame at a given rate, for the
live-reduction tests, the demo and ``tests/benchmarks/bench_live.py`` (docs/live.md).

It replays a recorded Bliss scan (``calypso sample-data diffraction`` or ``calypso
sample-data mx`` writes one; real scans work too) into a new raw dataset, in a process of
its own, as Bliss and Lima do:

- Lima files ``scanNNNN/<detector>_%04d.h5`` (or ``.edf``, ``.cbf``, ``.tiff``:
  ``saving``) of ``frames_per_file`` frames (one a CBF or TIFF file), each frame on disk
  once written, so that a reader of growing files sees it
  (:mod:`~calypso.flows.samples.lima_writer`);
- the dataset file's entry ``N.1`` (title, ``start_time``, sample, positioners, the
  instrument's metadata as recorded: the detector's geometry and pixel mask, the beam) first,
  then every counter point as its frame is written (SWMR: a reader never sees a point
  half-written), then the detector's data (a virtual dataset over the Lima files,
  stored in the EDF files, or the CBF or TIFF files named), ``end_reason`` and
  ``end_time``, written last;
- with ``blissdata_url``, the scan published on Bliss's data-stream server too: a Lima
  stream with the files' names and Lima's ``last_index_saved``, one stream a counter (a
  row a point for a map's 2D counters), ``end_reason``; the scan is closed only once the
  dataset file holds ``end_time``.

A scan without detector frames (an XAS map: rows of 2D counters, one spectrum a point)
is replayed point by point the same way: no Lima file, each point's counter values (a row
of each 2D counter) written as its turn comes, the counters of another length (a map's
energy axis) whole at the start, ``end_reason`` and ``end_time`` last.

With blissdata, ``file_lag=N`` writes the dataset file's counter points N points behind the
stream (Bliss's writer can lag Redis), to show that a reader of the stream does not wait
for the file.

``abort_after=K`` stops after K frames as an aborted scan does (``end_reason``
``USER_ABORT``, ``end_time`` written); ``end=False`` then leaves the scan without an
end, as a crashed writer would. ``timeline`` (a JSON file) gets the wall time each frame
was wholly written, to measure the lag of a live reduction behind the detector.

Run as ``python -m calypso.flows.samples.acquisition_simulator SOURCE TARGET_ROOT``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calypso.flows.samples.lima_writer import ONE_IMAGE_A_FILE, SAVING_FORMATS, LimaWriter
from calypso.tasks.raw import bliss
from calypso.tasks.raw.data_policy import RawDataset


@dataclass(frozen=True)
class RecordedScan:
    """What is replayed: a scan of a Bliss dataset file and where its frames lie."""

    raw: RawDataset
    number: int
    title: str
    detector: str
    frames: list[tuple[str, str, int]]  # (Lima file, dataset, index) of every frame
    counters: dict[str, np.ndarray]  # a value (or a row: 2D counters) a point
    positioners: dict[str, Any]
    sample_name: str | None
    # Entry-relative paths of the instrument's metadata, copied when the scan starts: the
    # detector's geometry and pixel mask, the beam (MX needs them before the first frame).
    metadata: tuple[str, ...] = ()
    # Counters of another length than the scan's points (a map's energy axis): written
    # whole when the scan starts.
    static: dict[str, np.ndarray] | None = None

    @property
    def points(self) -> int:
        """The scan's points: its frames, or (no detector) its counters' first axis."""
        if self.detector:
            return len(self.frames)
        return max((len(v) for v in self.counters.values()), default=0)


def recorded_scan(source: str | Path, scan: int = 1, detector: str | None = None) -> RecordedScan:
    """Read what a recorded scan holds (its frames are read one at a time when replayed)."""
    path = Path(source)
    raw = RawDataset.from_path(path)
    info = bliss.select_scans(raw.raw_file, [scan])[0]
    if detector is None and not info.detectors:
        return _recorded_counter_scan(raw, scan, info.title)
    detector = bliss.choose_detector(raw.raw_file, [info], detector)
    lengths = bliss.counter_lengths(raw.raw_file, scan)
    with bliss.open_raw(raw.raw_file) as h5:
        entry = h5[f"{scan}.1"]
        data = entry[f"instrument/{detector}/data"]
        frames = []
        for source_map in data.virtual_sources():
            lima = (raw.raw_file.parent / source_map.file_name).resolve()
            first = source_map.vspace.get_select_bounds()[0][0]
            last = source_map.vspace.get_select_bounds()[1][0]
            inside = 0  # the whole source dataset (Bliss's layout), or a hyperslab of it
            if source_map.src_space.get_select_type() == h5py.h5s.SEL_HYPERSLABS:
                inside = source_map.src_space.get_select_bounds()[0][0]
            frames += [
                (str(lima), source_map.dset_name, inside + i) for i in range(last - first + 1)
            ]
        counters = {
            name: np.asarray(entry[f"measurement/{name}"][()])
            for name, length in lengths.items()
            if length == len(frames) and name != detector
        }
        positioners = {
            name: item[()]
            for name, item in entry.get("instrument/positioners", {}).items()
            if isinstance(item, h5py.Dataset)
        }
        metadata = _instrument_metadata(entry, detector, counters)
    return RecordedScan(
        raw, scan, info.title, detector, frames, counters, positioners,
        bliss.read_sample_name(raw.raw_file, scan), metadata,
    )  # fmt: skip


def _recorded_counter_scan(raw: RawDataset, scan: int, title: str) -> RecordedScan:
    """A scan without detector frames: its points are the first axis of its 2D counters
    (an XAS map: a spectrum a point, or an energy point a point when it was scanned an
    energy at a time), else of its longest 1D counters. A 1D counter as long as the 2D
    counters' rows is an axis written whole when the scan starts (a map's energies)."""
    with bliss.open_raw(raw.raw_file) as h5:
        entry = h5[f"{scan}.1"]
        found = {}
        for name in entry.get("measurement", {}):
            item = entry["measurement"].get(name)
            if isinstance(item, h5py.Dataset) and item.ndim in (1, 2):
                found[name] = np.asarray(item[()])
        rows = [len(v) for v in found.values() if v.ndim == 2]
        points = max(rows or [len(v) for v in found.values()] or [0])
        row_lengths = {v.shape[1] for v in found.values() if v.ndim == 2}
        per_point = {
            n: v for n, v in found.items()
            if len(v) == points and (v.ndim == 2 or not rows or len(v) not in row_lengths)
        }  # fmt: skip
        static = {n: v for n, v in found.items() if n not in per_point}
        positioners = {
            name: item[()]
            for name, item in entry.get("instrument/positioners", {}).items()
            if isinstance(item, h5py.Dataset)
        }
        metadata = _instrument_metadata(entry, "", found)
    return RecordedScan(
        raw, scan, title, "", [], per_point, positioners,
        bliss.read_sample_name(raw.raw_file, scan), metadata, static,
    )  # fmt: skip


def _instrument_metadata(entry: h5py.Group, detector: str, counters: dict) -> tuple[str, ...]:
    """What the scan's instrument holds besides counters, positioners and the frames:
    the detector's other fields (geometry, pixel mask, type) and other groups (beam,
    monochromator), as paths relative to the entry."""
    found = []
    for name, item in entry.get("instrument", {}).items():
        if name in counters or name == "positioners":
            continue
        if name == detector and isinstance(item, h5py.Group):
            found += [f"instrument/{name}/{field}" for field in item if field != "data"]
        else:
            found.append(f"instrument/{name}")
    return tuple(found)


def simulate_acquisition(
    source: str | Path,
    target_root: str | Path,
    *,
    scan: int = 1,
    rate: float = 20.0,
    frames_per_file: int = 10,
    frames: int | None = None,
    blissdata_url: str | None = None,
    abort_after: int | None = None,
    end: bool = True,
    timeline: str | Path | None = None,
    start_delay: float = 0.0,
    file_lag: int = 0,
    saving: str = "hdf5",
) -> Path:
    """Replay scan ``scan`` of ``source`` (a raw dataset folder or its file) into the same
    raw dataset under ``target_root``, ``rate`` frames a second; returns the new dataset
    file. ``frames`` replays the first ones only (a scan of that many points).
    ``file_lag`` (with ``blissdata_url``): the dataset file gets each point's counters
    that many points after the stream, as Bliss's writer may lag its data streams; it
    catches up when the scan stops. ``saving``: Lima's saving format, ``hdf5``, ``edf``,
    ``cbf`` or ``tiff`` (:mod:`~calypso.flows.samples.lima_writer`)."""
    recorded = recorded_scan(source, scan)
    if saving in ONE_IMAGE_A_FILE:
        frames_per_file = 1  # as Lima saves CBF and TIFF images
    n_frames = min(frames or recorded.points, recorded.points)
    written = n_frames if abort_after is None else min(abort_after, n_frames)
    raw = recorded.raw.model_copy(update={"root": Path(target_root).absolute()})
    raw.raw_dataset_dir.mkdir(parents=True, exist_ok=True)
    lima_dir = raw.raw_dataset_dir / f"scan{scan:04d}"
    lima_dir.mkdir(exist_ok=True)
    shape, dtype = (), np.dtype("uint16")
    if recorded.detector:
        with h5py.File(recorded.frames[0][0], "r") as h5:
            shape, dtype = h5[recorded.frames[0][1]].shape[1:], h5[recorded.frames[0][1]].dtype
    lima = LimaWriter(lima_dir, recorded.detector, saving, shape, dtype)
    template = lima.template
    time.sleep(start_delay)
    publisher = None
    if blissdata_url:
        from calypso.flows.samples.bliss_publisher import BlissPublisher

        publisher = BlissPublisher(
            blissdata_url, recorded, raw, template, n_frames, frames_per_file
        )
    counters = _start_entry(raw, recorded)
    times: list[float] = []  # each point wholly in the files
    published: list[float] = []  # ... and on the stream
    began = time.monotonic()
    try:
        for index in range(written):
            number, slot = divmod(index, frames_per_file)
            if slot == 0 and recorded.detector:
                count = min(frames_per_file, n_frames - index)
                lima.start_file(number, count)
            pause = began + index / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if recorded.detector:
                lima.write(recorded.frames[index], slot)  # on disk: a reader sees it now
                if slot == count - 1 or index == written - 1:
                    lima.close_file()
            if publisher is not None and file_lag:  # the stream first, the file behind it
                publisher.frame(index, {n: v[index] for n, v in recorded.counters.items()})
                published.append(time.time())
            while len(times) <= index - file_lag:
                _write_point(counters, recorded, len(times))
                times.append(time.time())
            if publisher is not None and not file_lag:
                publisher.frame(index, {n: v[index] for n, v in recorded.counters.items()})
                published.append(time.time())
        while len(times) < written:  # the file catches up once the scan has stopped
            _write_point(counters, recorded, len(times))
            times.append(time.time())
    finally:
        lima.close()
        counters["__file__"].close()
    if timeline is not None:
        Path(timeline).write_text(json.dumps({"written": times, "published": published}))
    if not end:
        return raw.raw_file  # a writer that died: no end_time, the stream never closed
    reason = "SUCCESS" if written == n_frames else "USER_ABORT"
    _end_entry(raw, recorded, lima, written, frames_per_file, reason)
    if publisher is not None:
        publisher.end(reason)
        if publisher.gone:  # its streams, collected, would wait for the server forever
            _UNREACHABLE.append(publisher)
    return raw.raw_file


# Publishers whose server went away, kept from the garbage collector until the process
# leaves (``main`` ends with ``os._exit``): a blissdata stream collected waits for its
# server to take what it holds, which it never will.
_UNREACHABLE: list[Any] = []


def _write_point(counters: dict[str, Any], recorded: RecordedScan, index: int) -> None:
    """Point ``index`` of every counter into the dataset file, flushed (SWMR readers see
    it whole)."""
    for name, values in recorded.counters.items():
        counters[name].resize(index + 1, axis=0)
        counters[name][index] = values[index]
        counters[name].flush()


def _start_entry(raw: RawDataset, recorded: RecordedScan) -> dict[str, Any]:
    """Entry ``N.1`` without its end, the instrument's metadata as recorded (as Bliss
    writes it at the start); the counters' datasets, growing under SWMR (the open file is
    kept under ``__file__``)."""
    h5 = h5py.File(raw.raw_file, "a", libver="latest")
    h5.attrs["NX_class"] = "NXroot"
    h5.attrs["creator"] = "Bliss (simulated by calypso's acquisition simulator)"
    entry = h5.create_group(f"{recorded.number}.1")
    entry.attrs["NX_class"] = "NXentry"
    entry["title"] = recorded.title
    entry["start_time"] = datetime.now(UTC).astimezone().isoformat()
    instrument = entry.create_group("instrument")
    instrument.attrs["NX_class"] = "NXinstrument"
    measurement = entry.create_group("measurement")
    measurement.attrs["NX_class"] = "NXcollection"
    counters: dict[str, Any] = {"__file__": h5}
    for name, values in recorded.counters.items():
        group = instrument.create_group(name)
        group.attrs["NX_class"] = "NXdetector"
        row = values.shape[1:]  # a 2D counter grows a row (a spectrum) a point
        counters[name] = group.create_dataset(
            "data", shape=(0, *row), maxshape=(None, *row), chunks=(1, *row) if row else (256,),
            dtype=values.dtype,
        )  # fmt: skip
        measurement[name] = h5py.SoftLink(f"/{recorded.number}.1/instrument/{name}/data")
    for name, values in (recorded.static or {}).items():  # a map's energy axis: whole, first
        group = instrument.create_group(name)
        group.attrs["NX_class"] = "NXdetector"
        group["data"] = values
        measurement[name] = h5py.SoftLink(f"/{recorded.number}.1/instrument/{name}/data")
    motors = instrument.create_group("positioners")
    motors.attrs["NX_class"] = "NXcollection"
    for name, value in recorded.positioners.items():
        motors[name] = value
    sample = entry.create_group("sample")
    sample.attrs["NX_class"] = "NXsample"
    sample["name"] = recorded.sample_name or raw.collection
    _copy_metadata(recorded, entry)
    h5.swmr_mode = True  # from here on, readers see each counter point whole
    return counters


def _copy_metadata(recorded: RecordedScan, entry: h5py.Group) -> None:
    """The recorded instrument metadata into ``entry`` (groups with their NX_class)."""
    if not recorded.metadata:
        return
    with bliss.open_raw(recorded.raw.raw_file) as source:
        recorded_entry = source[f"{recorded.number}.1"]
        for path in recorded.metadata:
            parent_path, name = path.rsplit("/", 1)
            parent = entry.require_group(parent_path)
            for key, value in recorded_entry[parent_path].attrs.items():
                parent.attrs.setdefault(key, value)
            source.copy(recorded_entry[path], parent, name=name)


def _end_entry(
    raw: RawDataset, recorded: RecordedScan, lima: LimaWriter, written: int, per_file: int,
    reason: str,
) -> None:  # fmt: skip
    """The detector's data over the Lima files (a scan with a detector), ``end_reason``,
    then ``end_time``."""
    with h5py.File(raw.raw_file, "a") as h5:
        entry = h5[f"{recorded.number}.1"]
        if recorded.detector:
            lima.detector_dataset(entry, written, per_file)
        entry["end_reason"] = reason
        entry["end_time"] = datetime.now(UTC).astimezone().isoformat()  # written last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="recorded raw dataset folder (or its .h5 file)")
    parser.add_argument("target_root", help="root under which the scan is written again")
    parser.add_argument(
        "--scan", type=int, action="append",
        help="scan to replay (repeat for a sequence, replayed in turn; default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--gap", type=float, default=0.0, help="seconds between the scans of a sequence"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="frames a second")
    parser.add_argument("--frames", type=int, help="replay only the first N frames")
    parser.add_argument("--frames-per-file", type=int, default=10)
    parser.add_argument(
        "--saving", choices=SAVING_FORMATS, default="hdf5", help="Lima's saving format"
    )
    parser.add_argument("--blissdata", metavar="URL", help="publish through blissdata too")
    parser.add_argument("--abort-after", type=int, metavar="K", help="abort after K frames")
    parser.add_argument("--no-end", action="store_true", help="stop without end_time")
    parser.add_argument("--timeline", help="JSON file: when each frame was written")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds before start")
    parser.add_argument(
        "--start-after", metavar="FILE",
        help="start (then wait --start-delay) once FILE exists: a script starts the writer "
        "ahead, its imports done, and tells it when",
    )  # fmt: skip
    parser.add_argument(
        "--file-lag", type=int, default=0, metavar="N",
        help="with --blissdata: the dataset file's counters N points behind the stream",
    )  # fmt: skip
    args = parser.parse_args(argv)
    scans = args.scan or [1]
    if args.start_after:
        if args.blissdata:  # imported now, not once told to start
            import calypso.flows.samples.bliss_publisher  # noqa: F401
        from calypso.tasks.plans.live import wait

        told = Path(args.start_after)
        wait(told.exists, 600.0, f"{told} did not appear: nothing written", poll=0.02)
    for index, scan in enumerate(scans):
        # Options about how a scan ends apply to the last one of a sequence.
        last = index == len(scans) - 1
        path = simulate_acquisition(
            args.source, args.target_root, scan=scan, rate=args.rate,
            frames_per_file=args.frames_per_file, frames=args.frames,
            blissdata_url=args.blissdata, abort_after=args.abort_after if last else None,
            end=not args.no_end or not last, timeline=args.timeline if last else None,
            start_delay=args.start_delay if index == 0 else args.gap,
            file_lag=args.file_lag if args.blissdata else 0, saving=args.saving,
        )  # fmt: skip
    print(path, flush=True)
    if args.blissdata:
        # blissdata's sender threads never end once its server has gone away: leave
        # without waiting for them (the files and the stream are written and closed).
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
