"""A detector that Lima saves one image a file, CBF (a Pilatus's own format) or TIFF
(docs/live.md): an image is handed out once every byte its header announces is on disk,
never one begun; offline, Bliss's dataset file names the files frame by frame
(``scan0001/pilatus1m_0000.cbf::0``: its writer can neither link them nor store them
externally), and the frames are read from them, a missing or cut file refused; live, the
result is the offline one bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.samples.lima_writer import LimaWriter
from calypso.tasks.raw.frames import hdf5_frame_source, image_files_source, read_frames
from calypso.tasks.raw.lima_saving import image_frames, lima_files, lima_namings
from calypso.tasks.raw.live import LimaFiles, follow
from tests.test_live_edf import SHAPE, distinct_frames, frame
from tests.test_live_flow import saved_scan_as_offline

DATASET = "1.1/instrument/pilatus1m/data"


@pytest.fixture
def recorded(tmp_path) -> Path:
    return distinct_frames(tmp_path, 5)


def saved(folder: Path, recorded: Path, saving: str, count: int = 3) -> LimaWriter:
    """Frames 0 to ``count - 1`` of ``recorded`` in ``folder``, one image a file."""
    folder.mkdir()
    writer = LimaWriter(folder, "pilatus1m", saving, SHAPE, "uint16")
    for index in range(count):
        writer.start_file(index, 1)
        writer.write((str(recorded), "data", index), 0)
        writer.close_file()
    writer.close()
    return writer


def scan_file(tmp_path: Path, writer: LimaWriter, count: int = 3) -> Path:
    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        h5.create_group("1.1/instrument")
        h5.create_group("1.1/measurement")
        writer.detector_dataset(h5["1.1"], count, 1)
    return raw_file


@pytest.mark.parametrize("saving", ["cbf", "tiff"])
def test_an_image_counts_once_every_byte_is_on_disk(tmp_path, recorded, saving):
    """Images written one by one, each in two parts: each is handed out once, bit for bit;
    a file cut anywhere before its last pixel is counted begun, not whole."""
    folder = tmp_path / "scan0001"
    folder.mkdir()
    writer = LimaWriter(folder, "pilatus1m", saving, SHAPE, "uint16")
    files = LimaFiles(writer.template, npoints=5, stall_timeout=10)
    handed: list[tuple[int, int]] = []
    for index in range(5):
        writer.start_file(index, 1)
        writer.write((str(recorded), "data", index), 0)
        writer.close_file()
        handed += files.ready()
        assert files.frames == index + 1, (index, handed)
    writer.close()
    assert handed == [(i, i + 1) for i in range(5)] and files.finished
    np.testing.assert_array_equal(files.read(0, 5), np.stack([frame(i) for i in range(5)]))
    assert lima_namings(folder)["pilatus1m"][0].endswith(f"pilatus1m_%04d.{saving}")

    path = folder / f"pilatus1m_0004.{saving}"
    whole = path.read_bytes()
    last = len(whole)  # a TIFF's pixels are its last bytes; a CBF ends with a trailer
    if saving == "cbf":
        size = int(re.search(rb"X-Binary-Size: (\d+)", whole)[1])
        last = whole.index(b"\x0c\x1a\x04\xd5") + 4 + size
    for cut in (0, 10, len(whole) // 2, last - 1):
        path.write_bytes(whole[:cut])
        assert image_frames(path) == (0, 1), cut
    path.write_bytes(whole)
    assert image_frames(path) == (1, 1)


def test_a_later_image_is_not_taken_for_the_first_once_the_first_comes(tmp_path, recorded):
    """Lima's saving tasks may open pilatus1m_0001.cbf before pilatus1m_0000.cbf, and an
    image says not which frame it is: the first file is looked for again until frame 0
    is handed out. Where the later one was whole before the first appeared, the dataset
    file's names say so at the scan's end, and the run fails rather than give the frames
    as another scan's."""
    folder = tmp_path / "scan0001"
    writer = saved(folder, recorded, "cbf")
    first, second = folder / "pilatus1m_0000.cbf", folder / "pilatus1m_0001.cbf"
    held, held_second = first.read_bytes(), second.read_bytes()
    first.unlink()
    second.write_bytes(held_second[:40])  # file 1 begun, file 0 not there yet
    files = LimaFiles(
        folder / "pilatus1m_%04d.h5", npoints=3, stall_timeout=10,
        find_files=lambda: lima_files(tmp_path, 1, "pilatus1m"),
    )  # fmt: skip
    assert files.ready() == []
    first.write_bytes(held[:40])  # file 0 begun: the first
    second.write_bytes(held_second)
    assert files.ready() == []
    first.write_bytes(held)
    assert [r for r in follow(files, poll=0.01)] == [(0, 3)]
    np.testing.assert_array_equal(files.read(0, 3), np.stack([frame(i) for i in range(3)]))

    # The first file appeared only once the second was whole: taken for the first.
    first.unlink()
    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        h5.create_group("1.1/instrument/pilatus1m")
    files = LimaFiles(
        folder / "pilatus1m_%04d.h5", dataset_file=raw_file, scan=1, detector="pilatus1m",
        stall_timeout=10, find_files=lambda: lima_files(tmp_path, 1, "pilatus1m"),
    )  # fmt: skip
    assert files.ready() == [(0, 2)]
    first.write_bytes(held)
    scan_file(tmp_path, writer).replace(raw_file)
    with h5py.File(raw_file, "a") as h5:
        h5["1.1/end_time"] = "2026-12-07T10:00:00"
    with pytest.raises(RawDataError, match=r"names .*pilatus1m_0000.cbf as the scan's first"):
        files.ready()


@pytest.mark.parametrize("saving", ["cbf", "tiff"])
def test_a_bliss_scan_saved_as_images_is_read_from_the_files_it_names(tmp_path, recorded, saving):
    """Offline: the frames the dataset file names, in its order; a file missing or cut
    short is refused by name, never read as zeros; the watcher waits for them."""
    from calypso.tasks.raw.bliss import list_scans, missing_frame_sources

    folder = tmp_path / "scan0001"
    writer = saved(folder, recorded, saving)
    raw_file = scan_file(tmp_path, writer)
    with h5py.File(raw_file, "r") as h5:
        assert h5[DATASET][0] == f"scan0001/pilatus1m_0000.{saving}::0".encode()
    assert list_scans(raw_file)[0].detectors == {"pilatus1m": (3,)}
    source = hdf5_frame_source(raw_file, DATASET)
    assert source.kind == "images" and source.shape == (3, *SHAPE)
    np.testing.assert_array_equal(read_frames(source, 0, 3), np.stack([frame(i) for i in range(3)]))
    assert missing_frame_sources(raw_file, DATASET) == []

    path = folder / f"pilatus1m_0002.{saving}"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RawDataError, match=r"pilatus1m_0002\.\w+ is not whole"):
        hdf5_frame_source(raw_file, DATASET)
    path.unlink()
    with pytest.raises(RawDataError, match=r"missing or incomplete: .*pilatus1m_0002\.\w+ is"):
        hdf5_frame_source(raw_file, DATASET)
    assert missing_frame_sources(raw_file, DATASET) == [f"{path} is missing"]


@pytest.mark.parametrize("saving", ["edf", "tiff"])
def test_a_file_of_frames_named_frame_by_frame_is_waited_for_until_it_holds_them(tmp_path, saving):
    """A multi-frame EDF or multi-page TIFF named by FILE::INDEX (not Lima's layouts: Bliss
    stores EDF frames externally, TIFF is one image a file): only the file's being there,
    or each of its pages whole, was checked, so the watcher did not wait for its last
    frames, and reading them failed late."""
    import tifffile

    from calypso.tasks.raw.bliss import missing_frame_sources
    from tests.test_live_edf import edf_file

    folder = tmp_path / "scan0001"
    folder.mkdir()
    path = folder / f"frelon_0000.{saving}"

    def write(count: int) -> None:  # the first count frames
        if saving == "edf":
            edf_file(path, 0, count=count)
        else:
            with tifffile.TiffWriter(path) as tiff:
                for index in range(count):
                    tiff.write(frame(index))

    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        names = [f"scan0001/frelon_0000.{saving}::{index}" for index in range(4)]
        h5[DATASET] = np.array(names, dtype=object)
    write(2)
    expected = f"{path} holds 2 whole frames of the 4 named (still being written, or cut"
    assert missing_frame_sources(raw_file, DATASET)[0].startswith(expected)
    with pytest.raises(RawDataError, match="holds 2 whole frames of the 4 named"):
        hdf5_frame_source(raw_file, DATASET)
    write(4)
    assert missing_frame_sources(raw_file, DATASET) == []
    source = hdf5_frame_source(raw_file, DATASET)
    np.testing.assert_array_equal(read_frames(source, 0, 4), np.stack([frame(i) for i in range(4)]))


def test_frames_named_out_of_their_files_order_are_refused(tmp_path, recorded):
    folder = tmp_path / "scan0001"
    saved(folder, recorded, "cbf")
    raw_file = tmp_path / "sample_0001.h5"
    with h5py.File(raw_file, "w") as h5:
        names = ["scan0001/pilatus1m_0000.cbf::0", "scan0001/pilatus1m_0001.cbf::1"]
        h5[DATASET] = np.array(names, dtype=object)
    with pytest.raises(RawDataError, match="names frame 1 of .*pilatus1m_0001.cbf as frame 1"):
        hdf5_frame_source(raw_file, DATASET)


def test_a_cbf_that_disagrees_with_its_header_is_refused_as_it_is_read(tmp_path, recorded):
    """Only the first image is checked whole before the run (each would be read twice):
    every other is checked as it is read, its binary's checksum and values counted."""
    folder = tmp_path / "scan0001"
    writer = saved(folder, recorded, "cbf")
    source = hdf5_frame_source(scan_file(tmp_path, writer), DATASET)
    path = folder / "pilatus1m_0002.cbf"
    data = bytearray(path.read_bytes())
    data[-60] ^= 0xFF  # a bit flipped in the binary: its MD5 differs
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_frames(source, 0, 2), np.stack([frame(i) for i in range(2)]))
    with pytest.raises(RawDataError, match="pilatus1m_0002.cbf: the binary's MD5 checksum"):
        read_frames(source, 2, 3)


def test_confinement_follows_the_files_a_dataset_file_names(tmp_path, recorded):
    """A service reading with more rights than the proposal's members checks every file a
    run would read: the images a dataset file names are among them."""
    from calypso.registry.access.links import hdf5_links

    writer = saved(tmp_path / "scan0001", recorded, "tiff")
    raw_file = scan_file(tmp_path, writer)
    found = [(what, target) for _, what, _, target in hdf5_links((raw_file,))]
    assert found == [
        ("a frame reference", tmp_path / "scan0001" / f"pilatus1m_{n:04d}.tiff") for n in range(3)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["files", "blissdata"])
def test_a_scan_saved_as_cbf_gives_the_offline_result_while_it_runs(
    diffraction_sample, tmp_path, catalogue_path, live_settings, blissdata_url, source
):
    """The acquisition simulator saves the frames as Lima's CBF saving does (each image in
    two parts); the live run reads them while the scan runs."""
    names = saved_scan_as_offline(
        diffraction_sample, tmp_path, live_settings, blissdata_url, source, ("--saving", "cbf")
    )
    assert names == [f"pilatus1m_{n:04d}.cbf" for n in range(12)]


# -- a helper's sweep of CBF and TIFF variants (session 41) ------------------------------


def test_a_packbits_tiff_is_read_as_its_pixels(tmp_path):
    """fabio reads a single-strip PackBits TIFF (as Pillow writes one) as its compressed
    bytes, without an error: TIFF images are read by tifffile."""
    import fabio
    import tifffile

    image = np.random.default_rng(3).integers(1, 70000, (100, 120)).astype(np.int32)
    path = tmp_path / "pilatus1m_0000.tiff"
    tifffile.imwrite(path, image, compression="packbits", rowsperstrip=100)
    assert not np.array_equal(fabio.open(str(path)).data, image)  # what was read before
    source = image_files_source([path])
    np.testing.assert_array_equal(read_frames(source, 0, 1)[0], image)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_cut_tiff_is_refused_not_read_as_zeros(tmp_path, compression):
    """A TIFF cut short read as zeros (a compressed strip) or as its one row on disk over
    every row (fabio), where nothing looked at the file again before reading it: the
    image counted whole, then replaced, or an image series given offline."""
    import tifffile

    image = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30)
    path = tmp_path / "frame_0000.tiff"
    tifffile.imwrite(path, image, compression=compression)
    source = image_files_source([path])
    with tifffile.TiffFile(path) as tiff:
        start, count = tiff.pages.first.dataoffsets[0], tiff.pages.first.databytecounts[0]
    cut = start + (30 * 2 if compression is None else count // 2)  # one row; half a strip
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(RawDataError, match=r"(truncated|beyond the file's end)"):
        read_frames(source, 0, 1)


def test_a_live_image_of_another_shape_is_named(tmp_path, recorded):
    """An image of another detector among the scan's: a numpy traceback (LimaFiles.read),
    or the frame handed to the task unchecked (frames_of)."""
    from calypso.tasks.live_common import frames_of

    folder = tmp_path / "scan0001"
    saved(folder, recorded, "cbf")
    other = LimaWriter(tmp_path, "other", "cbf", (5, 6), "uint16")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["data"] = np.zeros((1, 5, 6), np.uint16)
    other.start_file(0, 1)
    other.write((str(tmp_path / "other.h5"), "data", 0), 0)
    other.close()
    (tmp_path / "other_0000.cbf").replace(folder / "pilatus1m_0001.cbf")
    files = LimaFiles(folder / "pilatus1m_%04d.cbf", npoints=3, stall_timeout=10)
    assert [r for r in follow(files, poll=0.01)] == [(0, 3)]
    with pytest.raises(RawDataError, match=r"pilatus1m_0001.cbf holds frames of shape \(5, 6\)"):
        files.read(0, 3)
    with pytest.raises(RawDataError, match=r"pilatus1m_0001.cbf holds a frame of shape \(5, 6\)"):
        list(frames_of(files.locations(0, 3), SHAPE))


def test_a_string_dataset_that_is_not_frame_names_is_no_link(tmp_path):
    """A user's file in the dataset's folder with strings that begin like FILE::INDEX: the
    confinement check ended in h5py's SystemError (an error raised in its visit)."""
    from calypso.registry.access.links import hdf5_links

    notes = tmp_path / "notes.h5"
    with h5py.File(notes, "w") as h5:
        h5["labels"] = np.array(["sample::1", "buffer", "sample::2"], dtype=object)
    assert [(what, target) for _, what, _, target in hdf5_links((notes,))] == [
        ("a frame reference", tmp_path / "sample")
    ]
    with pytest.raises(RawDataError, match="names frames as FILE::INDEX, not 'buffer'"):
        hdf5_frame_source(notes, "labels")


def test_a_tiff_cut_anywhere_is_read_whole_or_refused(tmp_path):
    """Every cut of a tiled TIFF and of a two-page one: the image as written, or a
    RawDataError (a file cut inside its tags ended in an IndexError or a ValueError)."""
    import tifffile

    from calypso.tasks.raw.tiff import read_tiff, tiff_layout

    for shape, options in (((64, 64), {"tile": (16, 16)}), ((2, 20, 30), {})):
        image = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
        path, cut_path = tmp_path / "whole.tiff", tmp_path / "cut.tiff"
        tifffile.imwrite(path, image, **options)
        whole = path.read_bytes()
        pages = image.shape[0] if image.ndim == 3 else 1
        for cut in range(0, len(whole) + 1, 3):
            cut_path.write_bytes(whole[:cut])
            try:
                tiff_layout(cut_path)
                read = np.stack(list(read_tiff(cut_path, range(pages))))
            except RawDataError:
                continue
            np.testing.assert_array_equal(read.reshape(image.shape), image, err_msg=str(cut))
