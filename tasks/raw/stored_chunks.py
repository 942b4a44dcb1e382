"""Frames read as HDF5 stored them: bitshuffle-LZ4 chunks decompressed by bitshuffle.

Lima writes each detector frame as one HDF5 chunk compressed with bitshuffle-LZ4, and so
do Dectris' Eiger files. Read through h5py, such a frame goes through HDF5's filter
pipeline and hdf5plugin's build of bitshuffle, which its portable wheels compile without
AVX2: 3.1 ms of CPU a Pilatus 1M frame here, all of it holding Python's GIL. The same
chunk read as it is stored (``read_direct_chunk``) and decompressed by bitshuffle's own
library (the filter's reference code, built with AVX2) takes 1.5 ms, the same frames
interleaved (scratch ``s33/bs5.py``); pyFAI integrates a frame in 21-27 ms. The values
are the same to the bit: the compression is lossless, and whatever this module cannot
read as stored is read through h5py as before.

Read as stored: a dataset of frames (n, rows, columns) whose chunks hold whole frames,
compressed with bitshuffle-LZ4 alone, of a native numeric type; or a virtual dataset
(Bliss's scan file) mapping whole frames of such datasets, one block of frames after
another, with the same type. Anything else, and any chunk that does not decode as its
header says (a chunk HDF5 stored unfiltered, one never written, a corrupt one), goes
through h5py, whose errors name the file as before.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import h5py
import numpy as np

# Imported with the readers, before any task sets its OpenMP threads: bitshuffle brings
# its own OpenMP runtime, one thread a core unless limited, and a task limits the
# runtimes loaded when it starts (calypso.executors.worker_setup). Loaded later, each
# frame's decompression took both cores beside the other task's integration.
from bitshuffle import decompress_lz4

from calypso.tasks.raw.bliss import open_raw

logger = logging.getLogger(__name__)

BITSHUFFLE = 32008  # HDF5's registered filter id of bitshuffle
_LZ4 = 2  # bitshuffle's fifth filter value: the blocks compressed with LZ4
_HEADER = 12  # a chunk's bytes uncompressed (8, big-endian), then its block size (4)

FrameReader = Callable[[int], np.ndarray]


@contextmanager
def frame_reader(dset: h5py.Dataset, path: str | Path) -> Iterator[FrameReader]:
    """``read(index)``: frame ``index`` of ``dset`` (in the file ``path``, where a virtual
    dataset's relative source names start), read as stored where it can be. The source
    files of a virtual dataset stay open until the ``with`` ends."""
    with ExitStack() as files:
        direct = _direct_reader(dset, Path(path), files)
        if direct is None:
            yield dset.__getitem__
            return

        def read(index: int) -> np.ndarray:
            frame = direct(index)
            return dset[index] if frame is None else frame

        yield read


def read_dataset_frames(dset: h5py.Dataset, path: str | Path, start: int, stop: int) -> np.ndarray:
    """Frames ``start:stop`` of ``dset`` as one array, read as stored where they can be."""
    with frame_reader(dset, path) as read:
        return np.stack([read(index) for index in range(start, stop)])


def _direct_reader(
    dset: h5py.Dataset, path: Path, files: ExitStack
) -> Callable[[int], np.ndarray | None] | None:
    """A reader of ``dset``'s frames as stored (None for a frame it cannot decode), or
    None where the dataset's layout does not allow it."""
    if dset.ndim != 3:
        return None
    if not dset.is_virtual:
        stored = _StoredFrames.of(dset)
        return None if stored is None else stored.frame
    blocks = _virtual_blocks(dset, path, files)
    if blocks is None:
        return None
    starts = [block[0] for block in blocks]

    def read(index: int) -> np.ndarray | None:
        at = bisect.bisect_right(starts, index) - 1
        first, stop, stored, source_first = blocks[at]
        return stored.frame(source_first + index - first) if first <= index < stop else None

    return read


def _virtual_blocks(
    dset: h5py.Dataset, path: Path, files: ExitStack
) -> list[tuple[int, int, _StoredFrames, int]] | None:
    """(first virtual frame, stop, its source, the source's first frame) for each mapping
    of a virtual dataset, in order; None unless every mapping takes a block of whole
    frames of a dataset that can be read as stored, of the virtual dataset's own type."""
    frame = tuple(dset.shape[1:])
    blocks: list[tuple[int, int, _StoredFrames, int]] = []
    opened: dict[Path, h5py.File] = {}
    try:
        sources = dset.virtual_sources()
    except (OSError, RuntimeError, ValueError):  # unlimited mappings (a scan being written)
        return None
    for source in sources:
        virtual, taken = _box(source.vspace), _box(source.src_space)
        if virtual is None or taken is None:
            return None
        (first, *corner), extent = virtual
        if tuple(extent[1:]) != frame or any(corner):
            return None
        source_path = path if source.file_name == "." else Path(source.file_name)
        if not source_path.is_absolute():
            source_path = path.parent / source_path
        if source_path not in opened:
            try:
                opened[source_path] = files.enter_context(open_raw(source_path))
            except Exception:  # what h5py then reads (or refuses) as the scan's own
                return None
        link = opened[source_path].get(source.dset_name, getlink=True)
        if not isinstance(link, h5py.HardLink):  # a link to follow: h5py follows it
            return None
        data = opened[source_path][source.dset_name]
        stored = _StoredFrames.of(data) if data.dtype == dset.dtype else None
        if stored is None:
            return None
        if source.src_space.get_select_type() == h5py.h5s.SEL_ALL:
            source_first, source_extent = 0, tuple(data.shape)
        else:
            (source_first, *source_corner), source_extent = taken
            if any(source_corner):
                return None
        if tuple(source_extent[1:]) != frame or source_extent[0] != extent[0]:
            return None
        if source_first + extent[0] > data.shape[0]:
            return None  # require_frames has refused it already; h5py says what it reads
        blocks.append((first, first + extent[0], stored, source_first))
    blocks.sort(key=lambda block: block[0])
    return blocks


def _box(space: h5py.h5s.SpaceID) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(start, extent) of a selection that is one box of elements, None for any other
    (strided, scattered); an "all" selection is the whole space."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        shape = space.shape
        return (0,) * len(shape), tuple(shape)
    if kind != h5py.h5s.SEL_HYPERSLABS:
        return None
    start, stop = space.get_select_bounds()
    extent = tuple(int(b) - int(a) + 1 for a, b in zip(start, stop, strict=True))
    if space.get_select_npoints() != int(np.prod(extent, dtype=np.int64)):
        return None
    return tuple(int(a) for a in start), extent


class _StoredFrames:
    """The frames of one dataset whose chunks hold whole frames in bitshuffle-LZ4 alone,
    each chunk decompressed once, as it was stored."""

    def __init__(self, dset: h5py.Dataset) -> None:
        self._dset = dset
        self._chunk_shape = tuple(dset.chunks)
        self._bytes = int(np.prod(self._chunk_shape)) * dset.dtype.itemsize
        self._last: tuple[int, np.ndarray | None] = (-1, None)

    @classmethod
    def of(cls, dset: h5py.Dataset) -> _StoredFrames | None:
        chunks = dset.chunks
        if chunks is None or dset.ndim != 3 or tuple(chunks[1:]) != tuple(dset.shape[1:]):
            return None
        if dset.dtype.kind not in "iuf" or not dset.dtype.isnative:
            return None
        plist = dset.id.get_create_plist()
        if plist.get_nfilters() != 1:
            return None
        code, _, values, _ = plist.get_filter(0)
        if code != BITSHUFFLE or len(values) < 5 or values[4] != _LZ4:
            return None
        return cls(dset)

    def frame(self, index: int) -> np.ndarray | None:
        """Frame ``index``, or None where its chunk does not decode as stored."""
        per_chunk = self._chunk_shape[0]
        number = index // per_chunk
        if self._last[0] != number:
            self._last = (number, self._chunk(number * per_chunk))
        chunk = self._last[1]
        return None if chunk is None else chunk[index - number * per_chunk]

    def _chunk(self, first: int) -> np.ndarray | None:
        try:
            mask, stored = self._dset.id.read_direct_chunk((first, 0, 0))
        except (OSError, KeyError, ValueError, RuntimeError):  # not written, unreadable
            return None
        size = int.from_bytes(stored[:8], "big")
        block = int.from_bytes(stored[8:_HEADER], "big")
        itemsize = self._dset.dtype.itemsize
        if mask or size != self._bytes or block % itemsize or len(stored) <= _HEADER:
            return None  # stored without the filter, or not a chunk of this shape
        try:
            return decompress_lz4(
                np.frombuffer(stored, np.uint8, offset=_HEADER),
                self._chunk_shape,
                self._dset.dtype,
                block // itemsize,
            )
        except (RuntimeError, ValueError) as exc:  # corrupt: h5py's read names it
            logger.debug("chunk at frame %d of %s not decoded: %s", first, self._dset.name, exc)
            return None
