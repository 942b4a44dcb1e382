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
compressed with bitshuffle-LZ4 (or bitshuffle-Zstd) alone, of a native numeric type; or
a virtual dataset (Bliss's scan file) mapping whole frames of such datasets, one block of
frames after another, with the same type. Anything else, and any chunk that does not decode as its
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
import hdf5plugin
import numpy as np

from calypso.errors import RawDataError
from calypso.executors.worker_setup import keep_single_threaded
from calypso.tasks.raw.bliss import open_raw, virtual_source_path

logger = logging.getLogger(__name__)

_HEADER = 12  # a chunk's bytes uncompressed (8, big-endian), then its block size (4)


def _openmp_runtimes() -> set[str]:
    from threadpoolctl import ThreadpoolController

    openmp = ThreadpoolController().select(user_api="openmp")
    return {runtime.filepath for runtime in openmp.lib_controllers}


def _bitshuffle_decoders() -> dict[int, Callable[..., np.ndarray]]:
    """bitshuffle's decoders by its fifth filter value (how the blocks are compressed; the
    chunk layout is the same). Imported with the readers, before any task sets its OpenMP
    threads: bitshuffle's wheel brings its own OpenMP runtime, one thread a core unless
    limited, and a task limits the runtimes loaded when it starts. That runtime keeps one
    thread (:func:`calypso.executors.worker_setup.keep_single_threaded`): with two, each
    frame's decompression took both cores beside the other task's integration."""
    loaded = _openmp_runtimes()
    import bitshuffle

    keep_single_threaded(_openmp_runtimes() - loaded)
    return {2: bitshuffle.decompress_lz4, 3: bitshuffle.decompress_zstd}


_DECOMPRESS = _bitshuffle_decoders()

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
    """Frames ``start:stop`` of ``dset`` as one array, read as stored where they can be
    (else in one read through h5py, as before)."""
    with ExitStack() as files:
        direct = _direct_reader(dset, Path(path), files) if stop > start else None
        if direct is None:
            return dset[start:stop]
        frames = np.empty((stop - start, *dset.shape[1:]), dset.dtype)
        for offset, index in enumerate(range(start, stop)):
            frame = direct(index)
            frames[offset] = dset[index] if frame is None else frame
        return frames


def _direct_reader(
    dset: h5py.Dataset, path: Path, files: ExitStack
) -> Callable[[int], np.ndarray | None] | None:
    """A reader of ``dset``'s frames as stored (None for a frame it cannot decode), or
    None where the dataset's layout does not allow it."""
    if dset.ndim != 3:
        return None
    try:
        reader = _VirtualFrames.of(dset, path, files) if dset.is_virtual else _StoredFrames.of(dset)
    except (OSError, RuntimeError, ValueError, KeyError):  # a layout h5py alone knows
        return None
    return None if reader is None else reader.frame


class _VirtualFrames:
    """The frames of a virtual dataset whose every mapping takes a block of whole frames
    of a source, read from their sources as stored. A source file is opened when one of
    its frames is first read (a task reads its chunk's, not the scan's hundreds of Lima
    files), and its frames go through h5py where it cannot be read as stored."""

    def __init__(
        self,
        dset: h5py.Dataset,
        blocks: list[tuple[int, int, Path, str, int]],
        files: ExitStack,
    ) -> None:
        self._dtype, self._files = dset.dtype, files
        self._blocks = sorted(blocks)
        self._starts = [block[0] for block in self._blocks]
        self._sources: dict[tuple[Path, str], _StoredFrames | None] = {}

    @classmethod
    def of(cls, dset: h5py.Dataset, path: Path, files: ExitStack) -> _VirtualFrames | None:
        """None unless every mapping takes a box of whole frames (first virtual frame,
        stop, source file, source dataset, the source's first frame)."""
        frame = tuple(dset.shape[1:])
        blocks = []
        for source in dset.virtual_sources():  # refused for unlimited mappings (raises)
            virtual, taken = _box(source.vspace), _box(source.src_space)
            if virtual is None or taken is None:
                return None
            (first, *corner), extent = virtual
            if tuple(extent[1:]) != frame or any(corner):
                return None
            source_first = 0
            if source.src_space.get_select_type() != h5py.h5s.SEL_ALL:
                (source_first, *source_corner), source_extent = taken
                if any(source_corner) or tuple(source_extent) != tuple(extent):
                    return None
            source_path = virtual_source_path(path, source.file_name)
            blocks.append((first, first + extent[0], source_path, source.dset_name, source_first))
        return cls(dset, blocks, files)

    def frame(self, index: int) -> np.ndarray | None:
        at = bisect.bisect_right(self._starts, index) - 1
        if at < 0:
            return None
        first, stop, path, name, source_first = self._blocks[at]
        if index >= stop:
            return None
        key = (path, name)
        if key not in self._sources:
            self._sources[key] = self._open(path, name)
        stored = self._sources[key]
        return None if stored is None else stored.frame(source_first + index - first)

    def _open(self, path: Path, name: str) -> _StoredFrames | None:
        """The source's frames as stored; None for h5py to read them (or refuse them, as
        the scan's own), as it reads a source linked or of another type. A source that
        cannot be opened is an error: it could when the run was planned (HDF5 would read
        its frames as zeros, without a word)."""
        try:
            h5 = self._files.enter_context(open_raw(path))
        except (RawDataError, OSError) as exc:
            raise RawDataError(
                f"{path}, a source of the scan's frames, cannot be opened now ({exc}); it "
                "could as the run began: was it removed or replaced meanwhile?"
            ) from None
        try:
            if not isinstance(h5.get(name, getlink=True), h5py.HardLink):
                return None
            data = h5[name]
            return _StoredFrames.of(data) if data.dtype == self._dtype else None
        except (RawDataError, OSError, RuntimeError, ValueError, KeyError):
            return None


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
    """The frames of one dataset whose chunks hold whole frames in bitshuffle (LZ4 or Zstd) alone,
    each chunk decompressed once, as it was stored."""

    def __init__(self, dset: h5py.Dataset, decompress: Callable[..., np.ndarray]) -> None:
        self._dset, self._decompress = dset, decompress
        self._chunk_shape, self._frames = tuple(dset.chunks), dset.shape[0]
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
        if code != hdf5plugin.BSHUF_ID or len(values) < 5 or values[4] not in _DECOMPRESS:
            return None
        return cls(dset, _DECOMPRESS[values[4]])

    def frame(self, index: int) -> np.ndarray | None:
        """Frame ``index``, or None where its chunk does not decode as stored."""
        if not 0 <= index < self._frames:
            return None
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
            return self._decompress(
                np.frombuffer(stored, np.uint8, offset=_HEADER),
                self._chunk_shape,
                self._dset.dtype,
                block // itemsize,
            )
        except (RuntimeError, ValueError) as exc:  # corrupt: h5py's read names it
            logger.debug("chunk at frame %d of %s not decoded: %s", first, self._dset.name, exc)
            return None
