"""Frames of a scan in progress (calypso.tasks.raw.live, docs/live.md): every frame is
handed out exactly once, whole, in order, while the writer is still writing; the end is
noticed; a writer that stops, a scan that vanishes and a server that goes away are named.

Two real writers: a blissdata scan published on a real valkey server (tests/live_servers.py)
by a thread that writes Lima files like Lima does (open, never flushed, closed when full),
and a separate process growing Lima HDF5 files frame by frame (SWMR, or flushed after
each frame), whose dataset is resized *before* each frame is written: a reader trusting
the shape would read zeros there.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.tasks.raw.lima_saving import LIMA_DATASET, complete_frames, lima_template
from calypso.tasks.raw.live import LimaFiles, LiveScan, follow

SHAPE = (24, 32)


def frame(index: int) -> np.ndarray:
    """What frame ``index`` holds: distinct, never zero (a zero frame is an unwritten one)."""
    rng = np.random.default_rng(index)
    return rng.integers(1, 60000, SHAPE, dtype=np.uint16)


def collect(scan: LiveScan, timeout: float = 20) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Follow ``scan`` to its end, reading every range as it comes."""
    ranges, frames = [], []
    deadline = time.monotonic() + timeout
    for first, stop in follow(scan, poll=0.01):
        ranges.append((first, stop))
        frames.append(scan.read(first, stop))
        assert time.monotonic() < deadline, "the scan never ended"
    return ranges, np.concatenate(frames) if frames else np.empty((0, *SHAPE))


def check_exactly_once(ranges: list[tuple[int, int]], frames: np.ndarray, count: int) -> None:
    position = 0
    for first, stop in ranges:
        assert first == position and stop > first, ranges
        position = stop
    assert position == count, ranges
    for index in range(count):
        np.testing.assert_array_equal(frames[index], frame(index), err_msg=f"frame {index}")


# -- the frame test inside one file ------------------------------------------------------


def test_a_frame_counts_once_its_chunk_is_stored(tmp_path):
    with h5py.File(tmp_path / "one.h5", "w") as h5:
        single = h5.create_dataset(
            "single", (0, 4, 4), "u2", chunks=(1, 4, 4), maxshape=(None, 4, 4)
        )
        single.resize(3, axis=0)
        single[0], single[1] = 1, 2  # frame 2 announced by the shape, not written
        h5.flush()
        assert complete_frames(single, final=False) == 2
        assert complete_frames(single, final=True) == 2

        multi = h5.create_dataset("multi", (6, 4, 4), "u2", chunks=(4, 4, 4))
        multi[0:6] = 7  # chunk 0 whole, chunk 1 half: frames 4 and 5 may not be alone
        h5.flush()
        assert complete_frames(multi, final=False) == 4
        assert complete_frames(multi, final=True) == 6

        flat = h5.create_dataset("flat", data=np.ones((3, 4, 4), "u2"))
        assert complete_frames(flat, final=False) == 0  # contiguous: only when final
        assert complete_frames(flat, final=True) == 3


def test_a_file_that_never_appears_is_named(tmp_path):
    template = lima_template(tmp_path, 3, "eiger")
    scan = LimaFiles(template, npoints=10, stall_timeout=0.3)
    assert scan.ready() == []
    time.sleep(0.4)
    with pytest.raises(RawDataError, match=r"eiger_0000.h5 did not appear.*0 frames"):
        scan.ready()


def test_a_lima_file_caught_with_its_header_half_written_is_read_once_whole(tmp_path):
    """HDF5 reports a structure caught half written with a version number it does not
    know as a RuntimeError, not an OSError (seen in CI: "bad object header version
    number" while the simulator created a Lima file): it is not ready yet, not a failure."""
    template = lima_template(tmp_path, 1, "pilatus")
    path = Path(template % 0)
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w", libver="latest") as h5:
        h5.create_dataset(
            LIMA_DATASET, data=np.stack([frame(0), frame(1)]), chunks=(1, *SHAPE)
        )  # a chunk a frame, as Lima writes
    whole = path.read_bytes()
    half = bytearray(whole)
    half[8] ^= 0x5A  # the superblock's version: what a reader may meet mid-write
    path.write_bytes(bytes(half))
    with pytest.raises(RuntimeError):  # as the SWMR read that is tried first meets it
        h5py.File(path, "r", locking=False, swmr=True)
    scan = LimaFiles(template, npoints=2, stall_timeout=30)
    assert scan.ready() == []
    path.write_bytes(whole)
    assert scan.ready() == [(0, 2)]
    assert scan.finished


@pytest.mark.parametrize("how", ["a symlink", "a hard link", "a symlinked scan folder"])
def test_a_file_appearing_by_another_name_is_not_read(tmp_path, how):
    """A live run was checked as its scan began; a Lima file that appears later as a
    link to a file elsewhere (another proposal's, read with the service's rights) is
    refused by name, not read."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with h5py.File(elsewhere / "pilatus_0000.h5", "w") as h5:
        h5.create_dataset(LIMA_DATASET, data=np.stack([frame(7), frame(8)]))
    dataset = tmp_path / "dataset"
    template = lima_template(dataset, 1, "pilatus")
    path = Path(template % 0)
    if how == "a symlinked scan folder":
        dataset.mkdir()
        path.parent.symlink_to(elsewhere)
    else:
        path.parent.mkdir(parents=True)
        link = path.symlink_to if how == "a symlink" else path.hardlink_to
        link(elsewhere / "pilatus_0000.h5")
    scan = LimaFiles(template, npoints=2, stall_timeout=30)
    with pytest.raises(RawDataError, match="a live scan reads only the files its acquisition"):
        scan.ready()


def test_a_scan_that_ends_early_is_finished_and_partial(tmp_path):
    """end_time in the dataset file after 7 of 20 frames: the 7 are handed out, then the
    end; the result is marked partial, never complete."""
    template = lima_template(tmp_path, 2, "pilatus")
    Path(template).parent.mkdir()
    for number, frames in enumerate([range(0, 5), range(5, 7)]):
        with h5py.File(template % number, "w") as h5:
            h5.create_dataset(LIMA_DATASET, data=np.stack([frame(i) for i in frames]))
    scan = LimaFiles(
        template, npoints=20, dataset_file=tmp_path / "dataset.h5", scan=2, detector="pilatus"
    )
    # contiguous datasets: file 0 is final (file 1 exists), file 1 is not while the scan runs
    assert scan.ready() == [(0, 5)] and scan.ready() == [] and not scan.finished
    with h5py.File(tmp_path / "dataset.h5", "w") as h5:
        h5["2.1/end_time"] = "2026-01-01T00:00:00"
    ranges, frames = collect(scan)
    check_exactly_once([(0, 5), *ranges], np.concatenate([scan.read(0, 5), frames]), 7)
    assert scan.finished and scan.partial


def test_frames_still_to_land_after_the_scan_ended_are_waited_for(tmp_path):
    """end_time written (the scan recorded 4 frames) while the Lima file holds 3 wholly
    on disk: the 4th is waited for in that file, not looked for in a next one (a live run
    once ended partial, 99 of 100 frames, looking for a file that never comes)."""
    template = lima_template(tmp_path, 2, "pilatus")
    Path(template).parent.mkdir()
    with h5py.File(template % 0, "w") as h5:
        data = h5.create_dataset(LIMA_DATASET, (4, *SHAPE), "u2", chunks=(1, *SHAPE))
        for index in range(3):
            data[index] = frame(index)
    with h5py.File(tmp_path / "dataset.h5", "w") as h5:
        h5["2.1/end_time"] = "2026-01-01T00:00:00"
        h5["2.1/instrument/pilatus/data"] = np.zeros((4, 1, 1), "u2")  # its 4 frames
    scan = LimaFiles(
        template, npoints=4, dataset_file=tmp_path / "dataset.h5", scan=2, detector="pilatus",
        stall_timeout=30,
    )  # fmt: skip
    assert scan.ready() == [(0, 3)] and not scan.finished
    with h5py.File(template % 0, "a") as h5:
        h5[LIMA_DATASET][3] = frame(3)
    assert scan.ready() == [(3, 4)]
    assert scan.finished and not scan.partial
    check_exactly_once([(0, 4)], scan.read(0, 4), 4)


# -- growing files written by another process --------------------------------------------

WRITER = """
import sys, time
import h5py, hdf5plugin, numpy as np

folder, frames, per_file, period, mode, stop_after = sys.argv[1:7]
frames, per_file, period, stop_after = int(frames), int(per_file), float(period), int(stop_after)

def frame(index):
    return np.random.default_rng(index).integers(1, 60000, (24, 32), dtype=np.uint16)

h5 = data = None
for index in range(frames):
    number, slot = divmod(index, per_file)
    if slot == 0:
        if h5 is not None:
            h5.close()
        count = min(per_file, frames - number * per_file)
        path = f"{folder}/scan0007/pilatus_{number:04d}.h5"
        if mode == "swmr":
            h5 = h5py.File(path, "w", libver="latest")
            data = h5.create_dataset("/entry_0000/measurement/data", (0, 24, 32), "u2",
                                     chunks=(1, 24, 32), maxshape=(None, 24, 32))
            h5.swmr_mode = True
        else:
            h5 = h5py.File(path, "w")
            data = h5.create_dataset("/entry_0000/measurement/data", (count, 24, 32), "u2",
                                     chunks=(1, 24, 32), **hdf5plugin.Bitshuffle(cname="lz4"))
            h5.flush()
    if index == stop_after:
        time.sleep(3600)  # a writer that hangs
    if mode == "swmr":
        data.resize(slot + 1, axis=0)  # the shape says the frame is there: it is not yet
        h5.flush()
        time.sleep(period / 2)
    data[slot] = frame(index)
    h5.flush()
    time.sleep(period / 2 if mode == "swmr" else period)
h5.close()
with h5py.File(f"{folder}/dataset.h5", "a") as master:
    entry = master.require_group("7.1")
    entry["title"] = "loopscan 20 0.05"
    entry["end_time"] = "2026-01-01T00:00:00"  # written last, as Bliss does
"""


def start_writer(folder: Path, mode: str, frames: int, stop_after: int = -1):
    (folder / "scan0007").mkdir(parents=True)
    script = folder / "writer.py"
    script.write_text(WRITER)
    command = [sys.executable, str(script), str(folder), str(frames), "5", "0.04", mode]
    return subprocess.Popen([*command, str(stop_after)])


@pytest.mark.parametrize("mode", ["swmr", "flushed"])
def test_growing_lima_files_hand_out_every_frame_once(tmp_path, mode):
    writer = start_writer(tmp_path, mode, frames=23)
    try:
        if mode == "swmr":  # the end is known from the frames the scan takes
            scan = LimaFiles(lima_template(tmp_path, 7, "pilatus"), npoints=23, stall_timeout=15)
        else:  # the end is known from end_time in the Bliss dataset file
            scan = LimaFiles(
                lima_template(tmp_path, 7, "pilatus"),
                dataset_file=tmp_path / "dataset.h5",
                scan=7,
                detector="pilatus",
                stall_timeout=15,
            )
        ranges, frames = collect(scan)
    finally:
        writer.wait(timeout=30)
    check_exactly_once(ranges, frames, 23)
    assert len(ranges) > 2, f"frames came only at the end: {ranges}"
    assert scan.finished and not scan.partial and scan.frames == 23
    if mode == "flushed":
        assert scan.info.name == "loopscan 20 0.05"


def test_a_stalled_writer_is_named(tmp_path):
    writer = start_writer(tmp_path, "flushed", frames=20, stop_after=7)
    template = lima_template(tmp_path, 7, "pilatus")
    try:
        while not Path(template % 0).exists():  # a loaded machine starts Python slowly
            assert writer.poll() is None
            time.sleep(0.02)
        scan = LimaFiles(template, npoints=20, stall_timeout=2)
        got = []
        with pytest.raises(RawDataError, match=r"pilatus_0001.h5 has held 2 complete frames"):
            for first, stop in follow(scan, poll=0.02):
                got.append(scan.read(first, stop))
    finally:
        writer.kill()
        writer.wait()
    check_exactly_once([(0, 7)], np.concatenate(got), 7)


# -- a blissdata scan on a real valkey server --------------------------------------------


@pytest.fixture
def blissdata_url(valkey_url):
    """The session's valkey, emptied and set up for blissdata."""
    import redis
    from blissdata.redis_engine.store import DataStore

    redis.Redis.from_url(valkey_url).flushall()
    DataStore(valkey_url, init_db=True)._redis.connection_pool.disconnect()
    return valkey_url


def test_a_scan_created_before_the_first_wait_is_found(blissdata_url, tmp_path, monkeypatch):
    """No scan on the server as the run looks, one created before it waits for the next:
    found (each wait began "from now", and a scan created in between was missed)."""
    from blissdata.redis_engine.store import DataStore

    from calypso.tasks.plans.live import find_stream_scan
    from calypso.tasks.raw import live_streams

    raw_file = tmp_path / "dataset.h5"
    connect = live_streams._connect

    def connected(url):
        store = connect(url)
        last = store.get_last_scan

        def last_then_one_created():
            try:
                return last()
            finally:
                identity = {"name": "loopscan", "number": 3, "data_policy": "no_policy"}
                DataStore(url).create_scan(identity, info={"filename": str(raw_file)})

        store.get_last_scan = last_then_one_created
        return store

    monkeypatch.setattr(live_streams, "_connect", connected)
    key = find_stream_scan(blissdata_url, raw_file, None, timeout=3)
    assert live_streams.load_scan(connect(blissdata_url), key).number == 3


class BlissScan(threading.Thread):
    """A Bliss scan with a Lima detector, published through blissdata: Lima files of
    ``per_file`` frames (open and never flushed until full, like Lima's), the Lima status
    after each saved frame, a diode counter; ``hang_after`` frames then silence. Once
    ``server_gone`` is set, only the Lima files are written (the server went away)."""

    def __init__(self, url, folder, frames=30, per_file=5, period=0.03, hang_after=None):
        super().__init__(daemon=True)
        from blissdata.redis_engine.store import DataStore

        self.folder, self.frames, self.per_file = folder, frames, per_file
        self.period, self.hang_after = period, hang_after
        self.template = lima_template(folder, 7, "pilatus")
        Path(self.template).parent.mkdir(parents=True)
        self.store = DataStore(url)
        identity = {"name": "loopscan", "number": 7, "data_policy": "no_policy"}
        self.scan = self.store.create_scan(
            identity, info={"npoints": frames, "title": f"loopscan {frames} 0.01"}
        )
        self.error: BaseException | None = None
        self.stopped = threading.Event()  # published the scan's end
        self.server_gone = threading.Event()

    def run(self):
        try:
            self.publish()
        except BaseException as exc:  # the test reports it
            self.error = exc

    def publish(self):
        from blissdata.streams.default import Stream
        from blissdata.streams.lima import LimaStream

        saving = {
            "file_path": self.template,
            "data_path": LIMA_DATASET,
            "file_format": "hdf5",
            "file_offset": 0,
            "frames_per_file": self.per_file,
        }
        image = LimaStream.make_definition(
            "pilatus:image", "uint16", SHAPE, "id00/limaccds/pilatus", 10, self.frames, 0, saving
        )
        lima = self.scan.create_stream(image)
        diode = self.scan.create_stream(Stream.make_definition("diode:diode", "float64"))
        self.scan.prepare()
        self.scan.start()
        h5 = None
        for index in range(self.frames):
            if index == self.hang_after:
                return
            number, slot = divmod(index, self.per_file)
            if slot == 0:
                count = min(self.per_file, self.frames - index)
                h5 = h5py.File(self.template % number, "w")
                data = h5.create_dataset(LIMA_DATASET, (count, *SHAPE), "u2", chunks=(1, *SHAPE))
            data[slot] = frame(index)
            if slot == count - 1:
                h5.close()
            if not self.server_gone.is_set():
                lima.send({"last_index": index, "last_index_saved": index})
                diode.send(index * 0.5)
            time.sleep(self.period)
        if self.server_gone.is_set():
            return
        self.stopped.set()  # from here on, the reader may see the stream sealed
        self.scan.stop()
        self.scan.info["end_reason"] = "SUCCESS"
        self.scan.close()


def test_a_blissdata_scan_hands_out_closed_lima_files_as_it_runs(blissdata_url, tmp_path):
    from blissdata.redis_engine.store import DataStore

    from calypso.tasks.raw.live_streams import BlissdataScan, wait_for_scan

    since = DataStore(blissdata_url).get_last_scan_timetag()
    writer = BlissScan(blissdata_url, tmp_path, frames=32, per_file=5)
    _, key = wait_for_scan(blissdata_url, since=since, timeout=5)
    assert key == writer.scan.key
    live = BlissdataScan(blissdata_url, key, detector="pilatus", counters=("diode:diode",))
    assert isinstance(live, LiveScan) and live.ready() == []  # created, not prepared
    writer.start()
    ranges, frames, during = [], [], []
    for first, stop in follow(live, poll=0.01):
        during.append(not writer.stopped.is_set())
        ranges.append((first, stop))
        frames.append(live.read(first, stop))
        # only whole files while the scan runs: 5 frames a file
        assert stop % 5 == 0 or writer.stopped.is_set(), ranges
    writer.join(timeout=10)
    assert writer.error is None, writer.error
    check_exactly_once(ranges, np.concatenate(frames), 32)
    assert sum(during) >= 2, f"frames came only at the end: {ranges}"
    assert live.finished and not live.partial and live.end_reason == "SUCCESS"
    info = live.info
    assert (info.number, info.name, info.npoints) == (7, "loopscan 32 0.01", 32)  # the title
    assert info.detectors == ("pilatus:image",) and "diode:diode" in info.counters
    np.testing.assert_array_equal(live.read_counters(3, 9)["diode:diode"], np.arange(3, 9) * 0.5)
    path, dataset, index = live.references(12, 13)[0]
    assert (Path(path).name, dataset, index) == ("pilatus_0002.h5", LIMA_DATASET, 2)
    live.close()


def test_a_scan_prepared_and_started_while_it_is_loaded_comes_with_its_streams(
    blissdata_url, tmp_path
):
    """blissdata loads a scan's model, then its state: Bliss preparing and starting the
    scan between the two reads (the writer's thread is made to do so) gives, from
    blissdata, a STARTED scan without streams; Calypso's scan has them at once."""
    from blissdata.redis_engine.scan import ScanState
    from blissdata.redis_engine.store import DataStore

    from calypso.tasks.raw.live_streams import load_scan

    def loaded_while_started(load):
        writer = BlissScan(blissdata_url, tmp_path / writer_folders.pop(), frames=4)
        reader = DataStore(blissdata_url)
        state_read = reader._redis.xrevrange

        def state_after_the_writer_started(*args, **kwargs):
            if not writer.is_alive():
                writer.start()  # prepares and starts the scan, then sends its frames
            while int(state_read(*args, **kwargs)[0][1][b"state"]) < ScanState.STARTED:
                time.sleep(0.001)  # the server's state, as the reader is to read it
            return state_read(*args, **kwargs)

        reader._redis.xrevrange = state_after_the_writer_started
        scan = load(reader, writer.scan.key)
        writer.join(timeout=10)
        assert writer.error is None, writer.error
        return scan

    writer_folders = ["a", "b"]
    scan = loaded_while_started(lambda store, key: store.load_scan(key))
    assert scan.state == ScanState.STARTED and scan.streams == {}  # the race, reproduced

    scan = loaded_while_started(load_scan)
    assert scan.state >= ScanState.STARTED
    assert {"pilatus:image", "diode:diode"} <= set(scan.streams)


def test_a_silent_blissdata_scan_and_a_deleted_one_are_named(blissdata_url, tmp_path):
    from calypso.tasks.raw.live_streams import BlissdataScan

    writer = BlissScan(blissdata_url, tmp_path, frames=30, per_file=5, hang_after=12)
    live = BlissdataScan(blissdata_url, writer.scan.key, stall_timeout=2)
    writer.start()
    handed = []
    with pytest.raises(RawDataError, match=r"STARTED with 12 frames of pilatus:image saved"):
        handed.extend(follow(live, poll=0.02))
    assert handed[-1][1] == 10  # the two files Lima closed, not the open third
    writer.join(timeout=10)

    writer.store.delete_scan(writer.scan.key, force=True)
    with pytest.raises(RawDataError, match="vanished from the blissdata server"):
        live.ready()


def test_when_the_server_goes_away_the_lima_files_give_the_rest(tmp_path):
    """The stream server stops mid-scan: the error says so, and the same scan's Lima
    files hand out the frames not yet handed out, none twice."""
    import redis
    from blissdata.redis_engine.store import DataStore

    from calypso.tasks.raw.live_streams import BlissdataScan
    from tests.live_servers import start_valkey, stop_valkey

    (tmp_path / "valkey").mkdir()
    server, url = start_valkey(tmp_path / "valkey")
    try:
        DataStore(url, init_db=True)
        writer = BlissScan(url, tmp_path, frames=30, per_file=5, period=0.04)
        live = BlissdataScan(url, writer.scan.key, stall_timeout=10)
        writer.start()
        ranges, frames = [], []
        with pytest.raises(RawDataError, match="went away.*as_files"):
            for first, stop in follow(live, poll=0.01):
                ranges.append((first, stop))
                frames.append(live.read(first, stop))
                if stop >= 10 and not writer.server_gone.is_set():
                    writer.server_gone.set()
                    stop_valkey(server)
    finally:
        stop_valkey(server)
    files = live.as_files()
    assert files.info.npoints == 30
    for first, stop in follow(files, poll=0.01):
        ranges.append((first, stop))
        frames.append(files.read(first, stop))
    writer.join(timeout=10)
    assert writer.error is None or isinstance(writer.error, redis.exceptions.RedisError)
    check_exactly_once(ranges, np.concatenate(frames), 30)


@pytest.mark.parametrize("name", ["pilatus1m_0000.cbf.gz", "pilatus1m_0000.edf.gz"])
def test_a_detector_saving_images_whole_only_once_closed_is_named(tmp_path, name):
    """A Lima saving gzipped CBF or EDF (a stream hands out its files) ended the live run
    in a Python traceback from h5py ("file signature not found"): one line that says
    what to do (EDF, CBF and TIFF are followed: tests/test_live_edf.py,
    tests/test_live_images.py)."""
    from calypso.tasks.raw.lima_saving import frame_type

    images = tmp_path / "scan0001" / name
    suffix = "".join(images.suffixes).replace(".", r"\.")
    with pytest.raises(RawDataError, match=rf"saves {suffix} images, whole only once closed"):
        frame_type(str(images), "")


@pytest.mark.parametrize(
    ("names", "frames_at"),
    [
        ("pilatus1m_{i}.h5", LIMA_DATASET),  # not padded
        ("pilatus1m_{i:04d}.h5", "/entry_0000/ESRF-ID00/pilatus1m/data"),  # no measurement
        ("pilatus1m_CeO2_{i:03d}.h5", LIMA_DATASET),  # the sample in Lima's saving prefix
    ],
)
def test_lima_files_are_followed_as_the_beamline_names_them(tmp_path, names, frames_at):
    """Lima's saving prefix, index format and first number are the beamline's, and its
    frames may lie only under entry_0000/<instrument>/<detector>: a live run from the
    files waited for scan0001/pilatus1m_0000.h5 and its measurement/data link, named no
    file, and gave up (a helper's trial of real layouts); with a prefix other than the
    detector's name it lost the wait for the last file's frames and named the result
    after the prefix. Numbered from 1 here, four frames a file, the last one shorter."""
    from calypso.tasks.plans.live import open_live_scan

    raw_file = tmp_path / "CeO2_0001" / "CeO2_0001.h5"
    (raw_file.parent / "scan0001").mkdir(parents=True)
    with h5py.File(raw_file, "w") as h5:
        h5["1.1/title"] = "loopscan 10 0.1"
        h5.create_group("1.1/instrument/pilatus1m")
    stacks = [range(0, 4), range(4, 8), range(8, 10)]
    for number, indices in enumerate(stacks, start=1):
        with h5py.File(raw_file.parent / "scan0001" / names.format(i=number), "w") as h5:
            h5.create_dataset(frames_at, data=np.stack([frame(i) for i in indices]))
    with h5py.File(raw_file, "a") as h5:
        h5["1.1/end_time"] = "2026-12-07T08:00:00"
    scan, number, detector = open_live_scan("files", raw_file, None, None, stall_timeout=10)
    assert (number, detector) == (1, "pilatus1m")
    ranges, frames = collect(scan)
    check_exactly_once(ranges, frames, 10)
    assert scan.locations(8, 10)[0][:2] == (
        str(raw_file.parent / "scan0001" / names.format(i=3)),
        frames_at,
    )
