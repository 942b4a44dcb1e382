"""Frames read as stored (bitshuffle-LZ4 chunks decompressed by bitshuffle): the same
values and types as h5py reads, whatever the layout; h5py where the layout does not allow
it, frame by frame where a chunk does not decode, and its errors as before."""

from contextlib import ExitStack
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.tasks.raw import stored_chunks
from calypso.tasks.raw.frames import hdf5_frame_source, iter_frames
from calypso.tasks.raw.lima_saving import read_lima

FRAME = (37, 29)
BITSHUFFLE_LZ4 = hdf5plugin.Bitshuffle(cname="lz4")


def frames_of(dtype: str, n: int, seed: int) -> np.ndarray:
    """Frames with every kind of value the type holds: its extremes, zeros, noise."""
    rng = np.random.default_rng(seed)
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    frames = rng.poisson(30, (n, *FRAME)).astype(dtype)
    frames[:, 0, :3] = [info.min, info.max, 0]
    if np.dtype(dtype).kind == "f":
        frames[:, 1, :3] = [np.nan, np.inf, -0.0]
    return frames


def write(path: Path, name: str, frames: np.ndarray, chunk_frames: int = 1, **filters):
    filters = filters or dict(BITSHUFFLE_LZ4)
    with h5py.File(path, "a") as h5:
        h5.create_dataset(name, data=frames, chunks=(chunk_frames, *FRAME), **filters)


def read_as_calypso(path: Path, name: str) -> list[np.ndarray]:
    source = hdf5_frame_source(path, name)
    return list(iter_frames(source, 0, source.n_frames))


def assert_same_as_h5py(path: Path, name: str) -> None:
    with h5py.File(path, "r") as h5:
        expected = [h5[name][index] for index in range(h5[name].shape[0])]
    got = read_as_calypso(path, name)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # NaN where NaN; -0.0 and 0.0 are equal here
        assert a.tobytes() == b.tobytes()  # ... so the bits too


def reads_as_stored(path: Path, name: str) -> bool:
    """Whether every frame of the dataset is read as stored."""
    return all(frames_read_as_stored(path, name))


def frames_read_as_stored(path: Path, name: str) -> list[bool]:
    with ExitStack() as files, h5py.File(path, "r") as h5:
        read = stored_chunks._direct_reader(h5[name], path, files)
        return [read is not None and read(i) is not None for i in range(h5[name].shape[0])]


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint32", "float32", "float64", "uint8"])
@pytest.mark.parametrize("chunk_frames", [1, 3])
@pytest.mark.parametrize("cname", ["lz4", "zstd"])
def test_bitshuffle_frames_are_read_as_stored_with_the_same_bits(
    tmp_path, dtype, chunk_frames, cname
):
    path = tmp_path / "lima.h5"
    frames = frames_of(dtype, 7, seed=chunk_frames)  # 7: a last chunk part-filled
    write(path, "entry/data", frames, chunk_frames, **hdf5plugin.Bitshuffle(cname=cname))
    assert reads_as_stored(path, "entry/data")
    assert_same_as_h5py(path, "entry/data")


@pytest.mark.parametrize(
    "filters",
    [
        {"compression": "gzip"},
        dict(hdf5plugin.Bitshuffle(cname="none")),
        dict(hdf5plugin.LZ4()),
        {"shuffle": True, **dict(BITSHUFFLE_LZ4)},  # two filters
    ],
    ids=["gzip", "bitshuffle-alone", "lz4-alone", "shuffle-then-bitshuffle"],
)
def test_other_compressions_are_read_through_h5py(tmp_path, filters):
    path = tmp_path / "other.h5"
    write(path, "data", frames_of("int32", 4, seed=1), **filters)
    assert not reads_as_stored(path, "data")
    assert_same_as_h5py(path, "data")


def test_chunks_that_are_not_whole_frames_and_big_endian_frames_are_read_through_h5py(tmp_path):
    path = tmp_path / "other.h5"
    frames = frames_of("int32", 4, seed=2)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("half", data=frames, chunks=(1, 20, 29), **BITSHUFFLE_LZ4)
        h5.create_dataset("big", data=frames.astype(">i4"), chunks=(1, *FRAME), **BITSHUFFLE_LZ4)
    for name in ("half", "big"):
        assert not reads_as_stored(path, name)
        assert_same_as_h5py(path, name)


def write_scan(folder: Path, strided: bool = False, other_type: bool = False) -> Path:
    """A Bliss scan file whose frames are a virtual dataset over two Lima files (4 and 3
    frames): blocks one after the other, or (``strided``) every other frame from each."""
    lima = [folder / "scan0001" / f"pilatus_{k:04d}.h5" for k in range(2)]
    lima[0].parent.mkdir(parents=True)
    counts = (4, 3)
    for path, count, seed in zip(lima, counts, (3, 4), strict=True):
        dtype = "int16" if other_type and seed == 4 else "int32"
        write(path, "entry_0000/measurement/data", frames_of(dtype, count, seed))
    layout = h5py.VirtualLayout(shape=(sum(counts), *FRAME), dtype="int32")
    first = 0
    for path, count in zip(lima, counts, strict=True):
        source = h5py.VirtualSource(
            Path("scan0001") / path.name, "entry_0000/measurement/data", shape=(count, *FRAME)
        )
        if strided:
            layout[first : 2 * count : 2] = source
            first += 1
        else:
            layout[first : first + count] = source
            first += count
    scan = folder / "sample_0001.h5"
    with h5py.File(scan, "w") as h5:
        h5.create_virtual_dataset("1.1/measurement/pilatus", layout)
    return scan


@pytest.mark.parametrize(
    "layout, as_stored",
    [
        ("blocks", [True] * 7),
        ("strided", [False] * 7),  # through h5py, which maps it
        ("a source of another type", [True] * 4 + [False] * 3),  # HDF5 converts the second
    ],
)
def test_a_scans_virtual_dataset_is_read_from_its_lima_files(tmp_path, layout, as_stored):
    scan = write_scan(tmp_path, strided=layout == "strided", other_type=layout != "blocks")
    assert frames_read_as_stored(scan, "1.1/measurement/pilatus") == as_stored
    assert_same_as_h5py(scan, "1.1/measurement/pilatus")


def test_a_chunk_stored_without_its_filter_or_never_written_is_read_by_h5py(tmp_path):
    path = tmp_path / "lima.h5"
    frames = frames_of("int32", 4, seed=5)
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset("data", shape=frames.shape, dtype="int32", chunks=(1, *FRAME),
                                 fillvalue=-1, **BITSHUFFLE_LZ4)  # fmt: skip
        data[:2] = frames[:2]
        # HDF5 stores a chunk unfiltered where an optional filter fails: mask bit 0 set.
        data.id.write_direct_chunk((2, 0, 0), frames[2].tobytes(), filter_mask=1)
        # Frame 3 never written: HDF5 reads the fill value.
    assert frames_read_as_stored(path, "data") == [True, True, False, False]
    assert_same_as_h5py(path, "data")
    got = read_as_calypso(path, "data")
    np.testing.assert_array_equal(got[2], frames[2])
    assert (got[3] == -1).all()


def test_a_corrupt_chunk_is_an_error_naming_the_file_as_before(tmp_path):
    path = tmp_path / "lima.h5"
    write(path, "data", frames_of("int32", 3, seed=6))
    with h5py.File(path, "r+") as h5:
        _, stored = h5["data"].id.read_direct_chunk((1, 0, 0))
        damaged = stored[:12] + bytes(len(stored) - 12)  # the header kept, the blocks lost
        h5["data"].id.write_direct_chunk((1, 0, 0), damaged)
    with pytest.raises(RawDataError, match=rf"{path.name}::data frames 0-2 cannot be read"):
        read_as_calypso(path, "data")


@pytest.mark.parametrize(
    "filters", [dict(BITSHUFFLE_LZ4), {"compression": "gzip"}], ids=["bitshuffle", "gzip"]
)
def test_a_live_lima_file_is_read_as_stored_or_through_h5py(tmp_path, filters):
    path = tmp_path / "pilatus_0000.h5"
    frames = frames_of("uint32", 5, seed=7)
    write(path, "entry_0000/measurement/data", frames, **filters)
    got = read_lima(path, "entry_0000/measurement/data", 1, 4)
    assert got.dtype == frames.dtype
    np.testing.assert_array_equal(got, frames[1:4])
    assert read_lima(path, "entry_0000/measurement/data", 2, 2).shape == (0, *FRAME)


def test_the_real_eiger_file_reads_as_stored_with_the_same_values(test_data):
    path = test_data / "xrd/biocat_eiger/vac_007_data_000001.h5"
    assert reads_as_stored(path, "entry/data/data")
    assert_same_as_h5py(path, "entry/data/data")
