"""Live reduction of a detector that Lima saves as EDF files (docs/live.md): a frame is
handed out once its header and every byte of its pixels are on disk, never a frame begun;
the scan is followed from its growing files or through blissdata, and the result is the
offline one bit for bit (offline, Bliss's dataset file stores the frames in the EDF files:
HDF5 external storage). Offline, a truncated EDF file is refused: fabio pads a frame it
cannot read whole with zeros."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.samples.lima_writer import LimaWriter
from calypso.tasks.raw.frames import image_files_source, read_frames
from calypso.tasks.raw.lima_saving import edf_frames, lima_namings
from calypso.tasks.raw.live import LimaFiles, follow
from tests.test_live_flow import saved_scan_as_offline

SHAPE = (6, 5)


def frame(index: int) -> np.ndarray:
    return np.random.default_rng(index).integers(1, 60000, SHAPE, dtype=np.uint16)


def distinct_frames(tmp_path: Path, count: int) -> Path:
    """Frames to replay: an HDF5 file of ``count`` distinct frames (:func:`frame`)."""
    path = tmp_path / "recorded.h5"
    with h5py.File(path, "w") as h5:
        h5["data"] = np.stack([frame(i) for i in range(count)])
    return path


@pytest.fixture
def recorded(tmp_path) -> Path:
    return distinct_frames(tmp_path, 7)


def test_an_edf_frame_counts_once_its_pixels_are_all_on_disk(tmp_path, recorded):
    """Frames written one by one, three a file: each is handed out once, bit for bit, and
    a frame whose header is there but not all its pixels is not."""
    folder = tmp_path / "scan0001"
    folder.mkdir()
    writer = LimaWriter(folder, "frelon", "edf", SHAPE, "uint16")
    files = LimaFiles(writer.template, npoints=7, stall_timeout=10)
    handed: list[tuple[int, int]] = []
    for index in range(7):
        number, slot = divmod(index, 3)
        if slot == 0:
            writer.close_file()
            writer.start_file(number, 3)
        writer.write((str(recorded), "data", index), slot)
        handed += files.ready()
        assert files.frames == index + 1, (index, handed)
    writer.close()
    assert [h for h in handed if h[1] > h[0]] == [(i, i + 1) for i in range(7)]
    np.testing.assert_array_equal(files.read(0, 7), np.stack([frame(i) for i in range(7)]))
    assert files.finished and lima_namings(folder)["frelon"][0].endswith("frelon_%04d.edf")

    # The seventh frame, begun: its header whole and half its pixels, or none of them,
    # is counted begun, not whole; its header half written, the file is not read yet.
    path = folder / "frelon_0002.edf"
    whole = path.read_bytes()
    pixels = frame(6).nbytes
    for cut in (len(whole) - pixels // 2, len(whole) - pixels):
        path.write_bytes(whole[:cut])
        assert edf_frames(path) == (0, 1), cut
    path.write_bytes(whole[:100])
    with pytest.raises(OSError):
        edf_frames(path)
    path.write_bytes(whole)
    assert edf_frames(path) == (1, 1)


def test_a_growing_edf_file_is_followed_to_the_scans_end(tmp_path, recorded):
    """The scan's end known from its dataset file (the frames Bliss recorded): the last
    frame, still to land in the last file when end_time is written, is waited for."""
    folder = tmp_path / "scan0001"
    folder.mkdir()
    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        h5.create_group("1.1/instrument/frelon")
        h5.create_group("1.1/measurement")
    writer = LimaWriter(folder, "frelon", "edf", SHAPE, "uint16")
    files = LimaFiles(writer.template, dataset_file=raw_file, scan=1, detector="frelon")
    writer.start_file(0, 10)
    for index in range(6):
        writer.write((str(recorded), "data", index), index)
    with h5py.File(raw_file, "a") as h5:  # Bliss ends the scan: 7 frames recorded
        h5["1.1/instrument/frelon"].create_dataset("data", (7, *SHAPE), "uint16")
        h5["1.1/end_time"] = "2026-12-07T10:00:00"
    ranges = [r for _ in range(3) for r in files.ready()]
    assert ranges == [(0, 6)] and not files.finished  # the seventh is still to come
    writer.write((str(recorded), "data", 6), 6)
    writer.close()
    assert [r for r in follow(files, poll=0.01)] == [(6, 7)] and files.finished
    assert not files.partial


def three_frames_saved(folder: Path, recorded: Path) -> LimaWriter:
    """Frames 0-2 of ``recorded`` in ``folder/frelon_0000.edf``, as Lima's EDF saving."""
    folder.mkdir()
    writer = LimaWriter(folder, "frelon", "edf", SHAPE, "uint16")
    writer.start_file(0, 3)
    for index in range(3):
        writer.write((str(recorded), "data", index), index)
    writer.close()
    return writer


def test_a_truncated_edf_file_is_refused_offline_not_padded(tmp_path, recorded):
    folder = tmp_path / "scan0001"
    three_frames_saved(folder, recorded)
    path = folder / "frelon_0000.edf"
    np.testing.assert_array_equal(
        read_frames(image_files_source([path]), 0, 3), np.stack([frame(i) for i in range(3)])
    )
    os.truncate(path, path.stat().st_size - 10)  # the last frame's last pixels lost
    with pytest.raises(RawDataError, match="frame 2 of .*frelon_0000.edf holds no readable"):
        image_files_source([path])


def edf_file(path: Path, first: int, count: int = 1) -> None:
    """An EDF file as Lima writes it, frames ``first`` to ``first + count - 1`` of the scan
    (``acq_frame_nb`` in each header)."""
    from fabio.edfimage import EdfFrame, EdfImage

    image = EdfImage(data=frame(first), header={"acq_frame_nb": first})
    for number in range(first + 1, first + count):
        image.append_frame(EdfFrame(data=frame(number), header={"acq_frame_nb": number}))
    image.write(str(path))


def test_a_later_edf_file_written_first_is_not_taken_for_the_first(tmp_path):
    """Lima's saving tasks write one frame a file in parallel: pilatus1m_0001.edf can appear
    before pilatus1m_0000.edf. Its first number read from the files, the run took 0001
    for the first file, and every frame after was the next one (a helper's trial)."""
    from calypso.tasks.raw.lima_saving import lima_files

    folder = tmp_path / "scan0001"
    folder.mkdir()
    files = LimaFiles(
        folder / "pilatus1m_%04d.h5", npoints=3, stall_timeout=10,
        find_files=lambda: lima_files(tmp_path, 1, "pilatus1m"),
    )  # fmt: skip
    edf_file(folder / "pilatus1m_0001.edf", 1)
    assert files.ready() == [] and files.ready() == []  # frame 0's file is still to come
    edf_file(folder / "pilatus1m_0000.edf", 0)
    edf_file(folder / "pilatus1m_0002.edf", 2)
    assert [r for r in follow(files, poll=0.01)] == [(0, 3)]
    np.testing.assert_array_equal(files.read(0, 3), np.stack([frame(i) for i in range(3)]))


def test_an_edf_file_rewritten_with_fewer_frames_is_named(tmp_path):
    """Lima's old EDFConcat saving rewrites its one header: the frames counted went 1, 0,
    1 and frame 0 was handed out again and again (a helper's trial)."""
    folder = tmp_path / "scan0001"
    folder.mkdir()
    files = LimaFiles(folder / "frelon_%04d.edf", npoints=4, stall_timeout=10)
    edf_file(folder / "frelon_0000.edf", 0, count=2)
    assert files.ready() == [(0, 2)]
    edf_file(folder / "frelon_0000.edf", 0, count=1)
    with pytest.raises(RawDataError, match="held 2 complete frames, now 1: the Lima file was"):
        files.ready()


@pytest.mark.parametrize("name", ["pilatus1m_0000.cbf.gz", "pilatus1m_0000.edf.gz"])
def test_a_saving_followed_only_once_closed_is_named_at_once(tmp_path, name):
    """A gzipped CBF or EDF saving, followed from its files: named only after the whole
    stall time-out, as 'no Lima file appeared'."""
    import time

    from calypso.tasks.plans.live import open_live_scan

    raw_file = tmp_path / "sample_0001" / "sample_0001.h5"
    (raw_file.parent / "scan0001").mkdir(parents=True)
    with h5py.File(raw_file, "w") as h5:
        h5.create_group("1.1/instrument/pilatus1m")
    (raw_file.parent / "scan0001" / name).write_bytes(b"whatever a detector wrote")
    began = time.monotonic()
    scan, _, _ = open_live_scan("files", raw_file, None, None, stall_timeout=30)
    with pytest.raises(RawDataError, match="images, whole only once closed"):
        scan.ready()
    assert time.monotonic() - began < 10


def test_an_edf_scan_whose_files_are_short_is_refused_offline(tmp_path, recorded):
    """Offline, a Bliss dataset file stores an EDF saving's frames in the EDF files (HDF5
    external storage), which HDF5 reads as zeros where a file is missing or short: a scan
    reduced at its end_time, the last frame still in Lima's buffer, looked complete."""
    from calypso.tasks.raw.frames import hdf5_frame_source

    folder = tmp_path / "scan0001"
    writer = three_frames_saved(folder, recorded)
    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        h5.create_group("1.1/instrument")
        h5.create_group("1.1/measurement")
        writer.detector_dataset(h5["1.1"], 3, 3)
    dataset = "1.1/instrument/frelon/data"
    source = hdf5_frame_source(raw_file, dataset)
    np.testing.assert_array_equal(read_frames(source, 0, 3), np.stack([frame(i) for i in range(3)]))
    path = folder / "frelon_0000.edf"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(RawDataError, match=r"frelon_0000.edf holds \d+ bytes, the frames"):
        hdf5_frame_source(raw_file, dataset)
    path.unlink()
    with pytest.raises(RawDataError, match="frelon_0000.edf is missing"):
        hdf5_frame_source(raw_file, dataset)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["files", "blissdata"])
def test_a_scan_saved_as_edf_gives_the_offline_result_while_it_runs(
    diffraction_sample, tmp_path, catalogue_path, live_settings, blissdata_url, source
):
    """The acquisition simulator saves the frames as Lima's EDF saving does (four frames a
    file, each written in two parts); the live run reads them while the scan runs."""
    saving = ("--saving", "edf", "--frames-per-file", "4")
    names = saved_scan_as_offline(
        diffraction_sample, tmp_path, live_settings, blissdata_url, source, saving
    )
    assert names == [f"pilatus1m_{n:04d}.edf" for n in range(3)]


def test_a_look_at_a_growing_edf_file_parses_only_the_frames_added(tmp_path, monkeypatch):
    """fabio alone parses every header of the file at each look (~50 µs a frame: 0.1 s a
    look at 2,000 frames) and again for each run of frames read from it."""
    from fabio.edfimage import EdfImage

    from calypso.tasks.raw.lima_saving import edf_first_frame, iter_edf

    parsed = []
    read_header = EdfImage._read_header_block
    monkeypatch.setattr(
        EdfImage,
        "_read_header_block",
        staticmethod(lambda infile, number: parsed.append(number) or read_header(infile, number)),
    )
    whole = tmp_path / "whole.edf"
    edf_file(whole, 0, count=8)
    data = whole.read_bytes()
    path = tmp_path / "frelon_0000.edf"
    size = len(data) // 8  # fabio writes frames of one size: header blocks, then pixels
    path.write_bytes(data[: 5 * size])
    assert edf_frames(path) == (5, 5) and len(parsed) == 6  # five headers, then the end
    with path.open("ab") as growing:
        growing.write(data[5 * size : 7 * size + 100])  # two frames, and a header begun
    parsed.clear()
    assert edf_frames(path) == (7, 8) and len(parsed) == 3
    parsed.clear()
    frames = list(iter_edf(path, 5, 7))  # a run's own headers only
    assert len(parsed) == 4  # the header begun, looked at again; the run's two; its end
    np.testing.assert_array_equal(np.stack(frames), np.stack([frame(5), frame(6)]))
    np.testing.assert_array_equal(next(iter_edf(path, 0, 1)), frame(0))
    # A file replaced, or cut short, or written again in place from its start (the same
    # inode, longer by then: another scan's frames, whose first header differs), is looked
    # at afresh.
    path.unlink()
    path.write_bytes(data[: 3 * size])
    assert edf_frames(path) == (3, 3)
    other = tmp_path / "other.edf"
    edf_file(other, 100, count=5)
    path.write_bytes(other.read_bytes())
    assert edf_frames(path) == (5, 5) and edf_first_frame(path) == 100
    assert next(iter_edf(path, 4, 5))[0, 0] == frame(104)[0, 0]
    path.write_bytes(data[: 3 * size])
    assert edf_frames(path) == (3, 3)
    # Pixels where the next header should be: not a file written a frame at a time.
    with path.open("ab") as growing:
        growing.write(data[-size // 2 :])
    with pytest.raises(RawDataError, match="begin no EDF header: the file is not written a"):
        edf_frames(path)
