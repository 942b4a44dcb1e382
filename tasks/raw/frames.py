"""Where frames come from: a detector dataset in HDF5, or a series of image files.

A :class:`FrameSource` is a small description (paths, dataset name, shape) that
travels between tasks; each task reads only the frames of its own chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import fabio
import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import ParameterError, RawDataError
from calypso.registry.access.links import file_references, referenced_file
from calypso.tasks.raw.bliss import open_raw, referenced_problems, require_frames
from calypso.tasks.raw.cbf import check_cbf, is_cbf, read_cbf
from calypso.tasks.raw.stored_chunks import frame_reader
from calypso.tasks.raw.tiff import is_tiff, read_tiff, tiff_layout

IMAGE_SUFFIXES = (
    *(".edf", ".cbf", ".tif", ".tiff", ".img", ".mccd", ".gz", ".bz2", ".npy"),
    # Other formats fabio reads: Mar345 plates, Bruker, Rigaku R-AXIS, GE (APS 1-ID, 11-ID).
    *(f".mar{size}" for size in (1200, 1600, 1800, 2000, 2300, 2400, 3000, 3450, 3600)),
    *(".sfrm", ".osc", ".ge", ".ge2", ".ge3", ".ge5"),
)
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".hdf")


class FrameSource(BaseModel):
    """A stack of frames: one HDF5 dataset, or image files read by fabio (``dataset``, if
    any: the dataset of a Bliss dataset file that names them, :func:`referenced_frames_source`)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["hdf5", "images"]
    files: tuple[str, ...]
    dataset: str | None = None
    frames_per_file: tuple[int, ...] = ()
    shape: tuple[int, int, int]
    dtype: str

    @property
    def n_frames(self) -> int:
        return self.shape[0]

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def describe(self) -> str:
        if self.kind == "hdf5":
            more = f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else ""
            return f"{self.files[0]}::{self.dataset}{more}"
        return (
            self.files[0] if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1})"
        )


def hdf5_frame_source(path: str | Path, dataset: str) -> FrameSource:
    """Describe a 3D (or single 2D) dataset of an HDF5 file as a frame stack."""
    with open_raw(path) as h5:
        if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
            raise RawDataError(f"{path} has no dataset {dataset}")
        dset = h5[dataset]
        references = file_references(dset)
        if references is not None:  # Lima's CBF, TIFF ... files, named frame by frame
            return referenced_frames_source(path, dataset, references)
        if dset.dtype.kind not in "biuf":
            what = "strings" if dset.dtype.kind in "SOU" else f"{dset.dtype} values"
            raise RawDataError(
                f"{path}::{dataset} holds {what}, not frames (nor images named as "
                "FILE::INDEX, one a frame): name the dataset of the detector's frames"
            )
        # Frames in other files (a virtual dataset; external storage: Lima's EDF files)
        stored_elsewhere = dset.is_virtual or dset.id.get_create_plist().get_external_count()
        if dset.ndim == 2:
            shape = (1, *dset.shape)
        elif dset.ndim == 3:
            shape = tuple(dset.shape)
        else:
            raise RawDataError(
                f"{path}::{dataset} has shape {dset.shape}: expected frames (n, rows, columns)"
            )
        dtype = str(dset.dtype)
    if stored_elsewhere:
        # HDF5 reads a missing source as zeros, and converts a source of another type or
        # frame size without a word: every source is checked before a frame is read.
        require_frames(path, dataset)
    return FrameSource(kind="hdf5", files=(str(path),), dataset=dataset, shape=shape, dtype=dtype)


def referenced_frames_source(
    path: str | Path, dataset: str, references: list[tuple[str, int]]
) -> FrameSource:
    """The frames a Bliss dataset names as ``FILE::INDEX`` (:func:`file_references`: a
    Lima saving in CBF or TIFF files, one image a file), read from those files in the
    scan's order. Each file's frames must be named from its first, in order (as Lima
    writes them); a file missing, or holding fewer frames than named, is refused."""
    from calypso.tasks.raw.lima_saving import is_image

    where = f"{path}::{dataset}"
    files: list[Path] = []
    counts: list[int] = []
    seen: set[Path] = set()
    for name, index in references:
        file = referenced_file(path, name)
        if files and file == files[-1] and index == counts[-1]:
            counts[-1] += 1
        elif index == 0 and file not in seen:
            files.append(file)
            counts.append(1)
            seen.add(file)
        else:
            again = " (the file is named twice)" if index == 0 else ""
            raise RawDataError(
                f"{where} names frame {index} of {file} as frame {sum(counts)} of the scan"
                f"{again}: each file's frames must come in their order, from its first; the "
                "dataset file does not describe a Lima saving Calypso reads"
            )
        if not file.name.lower().endswith(IMAGE_SUFFIXES):
            raise RawDataError(
                f"{where} names frames in {file}, which is not an image file (CBF, TIFF, "
                "EDF ...): the dataset file does not describe a Lima saving Calypso reads"
            )
    problems = referenced_problems(files, counts)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise RawDataError(
            f"{where} names detector files that are missing or incomplete: "
            f"{'; '.join(problems[:3])}{more}. Copy the Lima files next to the dataset file "
            "(or wait for the scan to finish) and run again; missing frames are never read "
            "as zeros."
        )
    # One image a file (CBF, TIFF): the first image gives the frames' shape and type; every
    # other is checked as it is read (a check of each here would read every file twice).
    single = all(count == 1 and is_image(file) for file, count in zip(files, counts, strict=True))
    if not single:
        return image_files_source(files, counts).model_copy(update={"dataset": dataset})
    first = image_files_source(files[:1], counts[:1])
    return first.model_copy(
        update={
            "files": tuple(map(str, files)),
            "frames_per_file": tuple(counts),
            "shape": (len(files), *first.frame_shape),
            "dataset": dataset,  # the scan's: which scan the frames are
        }
    )


def eiger_data_files(path: str | Path, whole: bool = False) -> list[tuple[Path, str]]:
    """The data files an Eiger master links as ``entry/data/data_NNNNNN``, in order, as
    (file, dataset); empty for any other file. With ``whole``, ``entry/data/data`` alone
    where the master has it (a virtual dataset or a link over every frame).

    Raises
    ------
    RawDataError
        When a linked data file is missing.
    """
    path = Path(path)
    with open_raw(path) as h5:
        data = h5.get("entry/data")
        if not isinstance(data, h5py.Group):
            return []
        names = list(data)  # the links' names: a missing data file is named, not skipped
        if whole and "data" in names:
            names = ["data"]
        else:
            names = sorted(name for name in names if re.fullmatch(r"data_\d+", name))
        links = {name: data.get(name, getlink=True) for name in names}
    found = []
    for name in names:
        link = links[name]
        if not isinstance(link, h5py.ExternalLink):
            found.append((path, f"entry/data/{name}"))
            continue
        target = Path(link.filename)
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            raise RawDataError(
                f"{path}: entry/data/{name} links to {target}, which is missing; copy the "
                "data files next to the master file"
            )
        found.append((target, link.path))
    return found


def hdf5_files_source(parts: list[tuple[Path, str]]) -> FrameSource:
    """Frame stacks of several HDF5 files (an Eiger's data files) as one, in order."""
    sources = [hdf5_frame_source(path, dataset) for path, dataset in parts]
    first = sources[0]
    for source in sources[1:]:
        if (source.frame_shape, source.dtype, source.dataset) != (
            first.frame_shape,
            first.dtype,
            first.dataset,
        ):
            raise RawDataError(
                f"{source.describe()} holds {source.dtype} frames of {source.frame_shape}, "
                f"{first.describe()} {first.dtype} frames of {first.frame_shape}: they are not "
                "one series"
            )
    if len(sources) == 1:
        return first
    counts = tuple(source.n_frames for source in sources)
    return first.model_copy(
        update={
            "files": tuple(str(path) for path, _ in parts),
            "frames_per_file": counts,
            "shape": (sum(counts), *first.frame_shape),
        }
    )


def default_image_dataset(path: str | Path) -> str:
    """The image dataset of a plain (non-Bliss) HDF5/NeXus file: its default NXdata signal."""
    from silx.io.nxdata import get_default

    with open_raw(path) as h5:
        nxdata = get_default(h5)
        if nxdata is not None and nxdata.signal is not None and nxdata.signal.ndim in (2, 3):
            return nxdata.signal.name
        found: list[str] = []

        def visit(name: str, item: object) -> None:
            if isinstance(item, h5py.Dataset) and item.ndim in (2, 3) and min(item.shape[-2:]) > 8:
                found.append("/" + name)

        h5.visititems(visit)
        links = (h5.get(name, getlink=True) for name in h5)
        linked = sorted({link.filename for link in links if isinstance(link, h5py.ExternalLink)})
    if len(found) == 1:
        return found[0]
    if linked and not found:  # Bliss's proposal and collection files: links to datasets
        more = f" and {len(linked) - 3} more" if len(linked) > 3 else ""
        raise RawDataError(
            f"{path} links to the dataset files {', '.join(linked[:3])}{more} (Bliss's "
            "proposal or sample file): give one of them, or its folder"
        )
    raise RawDataError(
        f"{path}: cannot tell which dataset holds the images "
        f"({'none found' if not found else 'candidates: ' + ', '.join(found)}); "
        "name it as FILE::/path/to/data"
    )


def image_files_source(files: list[Path], named: list[int] | None = None) -> FrameSource:
    """Describe image files (EDF, CBF, TIFF ...) as one frame stack, in the given order:
    every frame of each, or the first ``named[i]`` frames of file ``i``."""
    counts: list[int] = []
    shape: tuple[int, int] | None = None
    dtype = ""
    for number, path in enumerate(files):
        if is_cbf(path):
            # A CBF's header is compared with its binary first: fabio trusts the header.
            if not path.exists():
                raise RawDataError(f"{path} does not exist")
            info = check_cbf(path)
            frame_shape, frame_dtype, n = info.shape, info.dtype, 1
        elif is_tiff(path):  # tifffile: fabio misreads some (calypso.tasks.raw.tiff)
            n, frame_shape, frame_dtype = tiff_layout(path)
        else:
            image = _open_image(path)
            try:
                if getattr(image, "incomplete_file", False):  # fabio pads what is missing
                    raise _truncated(path, image.nframes - 1)
                frame_shape = tuple(image.shape[-2:])
                frame_dtype, n = str(image.data.dtype), max(1, image.nframes)
            finally:
                image.close()
        if shape is not None and frame_shape != shape:
            raise RawDataError(f"{path} has images of shape {frame_shape}, the others {shape}")
        shape, dtype = frame_shape, frame_dtype
        if named is not None:
            if n < named[number]:
                raise RawDataError(
                    f"{path} holds {n} frames, {named[number]} are named in the dataset "
                    "file: the file is incomplete; copy it again (or wait for the scan)"
                )
            n = named[number]
        counts.append(n)
    assert shape is not None
    return FrameSource(
        kind="images",
        files=tuple(str(p) for p in files),
        frames_per_file=tuple(counts),
        shape=(sum(counts), *shape),
        dtype=dtype,
    )


def _open_image(path: Path):
    if not path.exists():
        raise RawDataError(f"{path} does not exist")
    try:
        image = fabio.open(str(path))
    except Exception as exc:
        raise RawDataError(f"{path} cannot be read as an image by fabio: {exc}") from None
    if image.data is None:  # fabio read the header, the pixels are not all there
        image.close()
        raise _truncated(path)
    return image


def _truncated(path: Path | str, frame: int | None = None) -> RawDataError:
    which = f"frame {frame} of " if frame is not None else ""
    return RawDataError(
        f"{which}{path} holds no readable pixels: the file is truncated or damaged; copy it again"
    )


@contextmanager
def named_read_errors(what: str) -> Iterator[None]:
    """Turn a failed read (corrupt compressed chunk, truncated file) into a
    :class:`RawDataError` that names ``what`` was being read."""
    try:
        yield
    except OSError as exc:
        raise RawDataError(
            f"{what} cannot be read ({exc}): a detector file is corrupt or truncated; check "
            "it (h5dump, silx view) or copy it again"
        ) from None


def iter_frames(source: FrameSource, start: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``start:stop`` of a source, one at a time (the file stays open meanwhile).

    Reading frame by frame keeps a task's memory at one frame, and is faster
    than one big read through an HDF5 virtual dataset. Frames stored as Lima and Eiger
    store them are read as stored (:mod:`calypso.tasks.raw.stored_chunks`).

    Raises
    ------
    RawDataError
        When a frame cannot be read, naming the source and the frames.
    """
    if not 0 <= start < stop <= source.n_frames:
        raise ParameterError(
            f"frames {start}:{stop} are outside {source.describe()} ({source.n_frames} frames)"
        )
    with named_read_errors(f"{source.describe()} frames {start}-{stop - 1}"):
        yield from _frames(source, start, stop)


def _frames(source: FrameSource, start: int, stop: int) -> Iterator[np.ndarray]:
    counts = source.frames_per_file or (source.n_frames,)
    first = 0
    for path, count in zip(source.files, counts, strict=True):
        last = first + count
        if last > start and first < stop:
            indices = range(max(start, first) - first, min(stop, last) - first)
            if source.kind == "hdf5":
                yield from _hdf5_frames(path, str(source.dataset), indices)
            else:
                for frame in image_file_frames(path, count, indices):
                    if frame.shape != source.frame_shape or not np.can_cast(
                        frame.dtype, source.dtype, "safe"
                    ):
                        raise RawDataError(
                            f"{path} has images of shape {frame.shape} ({frame.dtype}), the "
                            f"scan's are {source.frame_shape} ({source.dtype}): it belongs "
                            "to another detector or scan"
                        )
                    yield frame
        first = last


def _hdf5_frames(path: str, dataset: str, indices: range) -> Iterator[np.ndarray]:
    with open_raw(path) as h5:
        dset = h5[dataset]
        if dset.ndim == 2:
            yield dset[()]
            return
        with frame_reader(dset, path) as read:
            for index in indices:
                yield read(index)


def image_file_frames(path: str, count: int, indices: range) -> Iterator[np.ndarray]:
    """Frames ``indices`` of an image file holding ``count``, each checked whole."""
    if is_tiff(path):
        yield from read_tiff(path, indices)
        return
    if is_cbf(path) and count == 1:
        # Its sections checked against each other as the pixels are decoded, once: a CBF
        # named by a Bliss dataset file is checked whole only as it is read.
        if not Path(path).exists():
            raise RawDataError(f"{path} does not exist")
        yield read_cbf(path)
        return
    image = _open_image(Path(path))
    try:
        for index in indices:
            frame = image if count == 1 else image.get_frame(index)
            # A frame whose pixels are not all in the file: fabio pads them with zeros
            # (it only logs it), which would look like a whole frame.
            if getattr(frame, "incomplete_data", False) or (
                count == 1 and getattr(image, "incomplete_file", False)
            ):
                raise _truncated(path, index)
            data = frame.data
            if data is None:
                raise _truncated(path, index)
            yield data
    finally:
        image.close()


def read_frames(source: FrameSource, start: int, stop: int) -> np.ndarray:
    """Frames ``start:stop`` of a source as one array (n, rows, columns)."""
    return np.stack(list(iter_frames(source, start, stop)))


def read_image(path: str | Path, what: str) -> np.ndarray:
    """One 2D image (mask, dark, flat) from any fabio format, ``.npy`` or ``FILE.h5::/path``."""
    text = str(path)
    if "::" in text:
        file_name, dataset = text.split("::", 1)
        with open_raw(file_name) as h5:
            if dataset not in h5:
                raise ParameterError(f"{what} {file_name} has no dataset {dataset}")
            data = h5[dataset][()]
    elif text.endswith(".npy"):
        try:
            data = np.load(text)
        except (OSError, ValueError) as exc:
            raise ParameterError(f"{what} {text} cannot be read: {exc}") from None
    elif is_tiff(text):
        try:
            data = next(read_tiff(text, range(1)))
        except RawDataError as exc:
            raise ParameterError(f"{what}: {exc}") from None
    else:
        try:
            image = _open_image(Path(text))
        except RawDataError as exc:
            raise ParameterError(f"{what}: {exc}") from None
        try:
            data = image.data
        finally:
            image.close()
    data = np.asarray(data)
    if data.ndim != 2:
        raise ParameterError(f"{what} {text} has shape {data.shape}: expected one 2D image")
    if data.dtype.kind not in "biuf":
        raise ParameterError(f"{what} {text} holds {data.dtype} values: expected numbers")
    return data
