"""Lima's files as a beamline saves them, read while they are written (docs/live.md).

Lima saves a detector's frames as the beamline sets its saving: HDF5 files (Bliss's
default, ``<detector>_0000.h5``), EDF files (``<detector>_0000.edf``: a text header, then
the frame's pixels, frame after frame) or one image a file (CBF, TIFF), under any prefix,
index format and first number. What a live scan needs of them is here, whatever the
format:

- the files of a scan's folder and the detector they belong to (:func:`lima_namings`);
- how many leading frames of a file are wholly on disk (:func:`complete_frames` for an
  HDF5 dataset's chunks, :func:`edf_frames` for an EDF file's frames,
  :func:`image_written` for a CBF or TIFF image);
- the frames of a run of one file, read without file locking, where the acquisition
  wrote them (:func:`read_run`, :func:`iter_run`), and its frame shape and type.

A compressed image file (``.edf.gz``, ``.cbf.gz``) is not followed while written: it is
whole only once closed, which no reader can tell before the scan's end.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle, LZ4 ... with HDF5)
import numpy as np

from calypso.errors import RawDataError
from calypso.tasks.raw.edf import edf_look, open_frames
from calypso.tasks.raw.edf import iter_edf as edf_run
from calypso.tasks.raw.stored_chunks import read_dataset_frames

LIMA_DATASET = "/entry_0000/measurement/data"
EDF_SUFFIXES = (".edf",)
IMAGE_SUFFIXES = (".cbf", ".tif", ".tiff")  # one image a file
FOLLOWED_SUFFIXES = (".h5", ".hdf5", ".nxs", *EDF_SUFFIXES, *IMAGE_SUFFIXES)


# -- the files of a scan's folder ----------------------------------------------------


# A Lima file: <prefix><number>.h5 (or .edf ...), the number padded or not
# (saving_index_format). Those not followed while written are found too, to be named.
_LIMA_FILE = re.compile(
    r"^(?P<prefix>.*?)(?P<number>\d+)\.(?P<suffix>h5|hdf5|nxs|edf|edf\.gz|edf\.bz2|cbf|"
    r"cbf\.gz|tiff?)$"
)


def lima_namings(scan_folder: Path) -> dict[str, tuple[str, int]]:
    """The Lima files in a scan's folder, by the detector their prefix names
    (``pilatus1m_0000.h5`` -> ``pilatus1m``): the template of their names (``%04d`` as
    their numbers are padded) and the first number. Lima's saving prefix, index format
    and first number are the beamline's: ``<det>_0000.h5`` is Bliss's default only."""
    numbers: dict[tuple[str, str], list[str]] = {}
    try:
        names = os.listdir(scan_folder)
    except OSError:
        return {}
    for name in names:
        if match := _LIMA_FILE.match(name):
            key = (match["prefix"], match["suffix"])
            numbers.setdefault(key, []).append(match["number"])
    namings = {}
    for (prefix, suffix), found in sorted(numbers.items()):
        first = min(found, key=int)
        template = str(scan_folder / f"{prefix}%0{len(first)}d.{suffix}")
        namings[prefix.rstrip("_-.") or prefix] = (template, int(first))
    return namings


def lima_detectors(dataset_dir: Path, number: int) -> tuple[str, ...]:
    """The detectors with Lima files in scan ``number``'s folder
    (:func:`lima_namings`): what names them while the dataset file may not say so yet."""
    return tuple(sorted(lima_namings(dataset_dir / f"scan{number:04d}")))


def frames_dataset(h5: h5py.File, detectors: tuple[str, ...] = ()) -> str | None:
    """The frames of a Lima file without the ``measurement/data`` link: the detector's
    ``entry_0000/<instrument>/<detector>/data`` (``ESRF-ID00``, ``instrument``), else the
    one stack of frames in ``entry_0000``; None while there is none yet."""
    entry = h5.get("entry_0000")
    if not isinstance(entry, h5py.Group):
        return None
    for group in entry:
        for detector in detectors:
            data = entry.get(f"{group}/{detector}/data")
            if isinstance(data, h5py.Dataset) and data.ndim >= 3:
                return data.name
    stacks: list[str] = []
    entry.visititems(
        lambda name, item: (
            stacks.append(item.name)
            if isinstance(item, h5py.Dataset) and item.ndim >= 3 and name.endswith("data")
            else None
        )
    )
    return stacks[0] if len(stacks) == 1 else None


def lima_files(raw_dataset_dir: str | Path, scan: int, detector: str) -> tuple[str, int] | None:
    """The template and first number of ``detector``'s Lima files in a scan's folder (a
    prefix that starts with its name too: ``pilatus1m_CeO2_0000.h5``); None while there
    is none."""
    namings = lima_namings(Path(raw_dataset_dir) / f"scan{scan:04d}")
    if detector in namings:
        return namings[detector]
    started = [n for n in namings if n.startswith(detector)]
    return namings[started[0]] if len(started) == 1 else None


def open_lima(path: str | Path) -> h5py.File:
    """Open a file of a scan in progress: one the acquisition wrote there
    (:func:`_written_here`), read as :func:`open_growing` does."""
    _written_here(Path(path))
    return open_growing(path)


def open_growing(path: str | Path) -> h5py.File:
    """Open an HDF5 file another process may still write: no file locking, SWMR read
    where the file allows it. ``OSError`` when it cannot be opened (yet): HDF5 reports a
    header caught half written as a RuntimeError ("bad object header version number")."""
    try:
        return h5py.File(path, "r", locking=False, swmr=True)
    except (OSError, RuntimeError):
        try:
            return h5py.File(path, "r", locking=False)
        except RuntimeError as exc:
            raise OSError(f"{path} cannot be opened (yet): {exc}") from None


def _written_here(path: Path) -> None:
    """Refuse a file of a scan in progress that is a symlink, has a second name (a hard
    link), or lies in a scan folder that is a symlink: the run was checked as the scan
    began, and a file appearing later by another name could be another proposal's (a
    service reads with rights the proposal's members do not have)."""
    try:
        status = os.lstat(path)
    except OSError:
        return  # not there yet: opening it says so
    folder = path.parent
    swapped = folder.name.startswith("scan") and folder.is_symlink()
    if stat.S_ISLNK(status.st_mode) or status.st_nlink > 1 or swapped:
        what = (
            "is a symlink" if stat.S_ISLNK(status.st_mode)
            else f"has {status.st_nlink} names (hard links)" if status.st_nlink > 1
            else "is in a scan folder that is a symlink"
        )  # fmt: skip
        raise RawDataError(
            f"{path} {what}: a live scan reads only the files its acquisition writes there"
        )


def read_lima(path: str | Path, dataset: str, first: int, stop: int) -> np.ndarray:
    """Frames ``first`` to ``stop - 1`` of one Lima file, or a RawDataError naming it."""
    try:
        with open_lima(path) as h5:
            data = h5[dataset]
            if data.shape[0] < stop:
                raise RawDataError(
                    f"{path}::{dataset} holds {data.shape[0]} frames, frame {stop - 1} "
                    "was announced: the Lima file was truncated or replaced"
                )
            return read_dataset_frames(data, path, first, stop)
    except (OSError, KeyError) as exc:
        raise RawDataError(
            f"frames {first}-{stop - 1} of Lima file {path}::{dataset} cannot be read "
            f"({exc}); the file is announced as complete"
        ) from None


# -- EDF files ------------------------------------------------------------------------


def require_followed(path: str | Path) -> None:
    """A RawDataError unless ``path`` is a Lima file live reduction follows while it is
    written (HDF5, EDF, CBF, TIFF): a compressed image is whole only once closed."""
    if not str(path).lower().endswith(FOLLOWED_SUFFIXES):
        suffix = "".join(Path(path).suffixes[-2:]) or "files"
        raise RawDataError(
            f"{path}: the detector saves {suffix} images, whole only once closed; live "
            "reduction follows Lima's HDF5, EDF, CBF and TIFF files: reduce this scan "
            "offline once it has ended (calypso run TECHNIQUE RAW)"
        )


# -- one image a file (CBF, TIFF) -----------------------------------------------------


def is_image(path: str | Path) -> bool:
    """A Lima file of one image (CBF, TIFF)."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def image_written(path: str | Path) -> bool:
    """Whether the one image of a CBF or TIFF file another process may still be writing
    is wholly on disk: every byte its header announces is there (a CBF's binary, a TIFF's
    strips or tiles). A file caught before its header is whole is not."""
    from calypso.tasks.raw.cbf import cbf_written
    from calypso.tasks.raw.tiff import tiff_written

    if str(path).lower().endswith(".cbf"):
        return cbf_written(path)
    return tiff_written(path)


def image_frames(path: str | Path) -> tuple[int, int]:
    """(frames wholly on disk, frames begun) of a CBF or TIFF file of a scan in progress,
    as :func:`edf_frames` counts them: (1, 1) once :func:`image_written`, else (0, 1)."""
    _written_here(Path(path))
    return int(image_written(path)), 1


def iter_image(path: str | Path, first: int, stop: int) -> Iterator[np.ndarray]:
    """The image of a CBF or TIFF file (``first``, ``stop``: 0, 1), checked whole as it is
    read (a CBF's sections agreeing with each other)."""
    from calypso.tasks.raw.frames import image_file_frames

    _written_here(Path(path))
    if (first, stop) != (0, 1):
        raise RawDataError(
            f"frames {first}-{stop - 1} of {path} were asked for: the file holds one image"
        )
    yield from image_file_frames(str(path), 1, range(1))


def _image_source(path: str | Path):
    """The :class:`~calypso.tasks.raw.frames.FrameSource` of one CBF or TIFF image, once
    checked whole (a CBF's sections agreeing with each other)."""
    from calypso.tasks.raw.frames import image_files_source

    _written_here(Path(path))
    return image_files_source([Path(path)])


def is_edf(path: str | Path) -> bool:
    """A Lima EDF file (one header a frame, then its pixels)."""
    return str(path).lower().endswith(EDF_SUFFIXES)


def edf_frames(path: str | Path) -> tuple[int, int]:
    """(frames wholly on disk, frames begun) of an EDF file another process may still write.

    A frame counts once its header is whole and the last byte of its pixels is on disk:
    Lima writes a frame's header, then its pixels, frame after frame, so a byte past the
    last whole frame is a frame begun. Only the frames added since the last look are
    parsed (:mod:`calypso.tasks.raw.edf`)."""
    return _edf_look(path)[:2]


def edf_first_frame(path: str | Path) -> int | None:
    """The number in the scan of an EDF file's first frame (Lima's ``acq_frame_nb``), if
    its header says."""
    return _edf_look(path)[2]


def _edf_look(path: str | Path) -> tuple[int, int, int | None]:
    """:func:`edf_frames` and :func:`edf_first_frame` of one look at the file."""
    _written_here(Path(path))
    status = os.stat(path)  # first: what fabio then finds whole was there by now
    return edf_look(path, status.st_size, status.st_ino)


def iter_edf(path: str | Path, first: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``first`` to ``stop - 1`` of an EDF file, all of them whole, one at a time."""
    _written_here(Path(path))
    yield from edf_run(path, first, stop)


# -- a run of frames of one file, whatever its format ----------------------------------


def read_run(path: str | Path, dataset: str, first: int, stop: int) -> np.ndarray:
    """Frames ``first`` to ``stop - 1`` of one Lima file (``dataset``: an HDF5 file's)."""
    if is_image(path):
        return np.stack(list(iter_image(path, first, stop)))
    if is_edf(path):
        return np.stack(list(iter_edf(path, first, stop)))
    return read_lima(path, dataset, first, stop)


def iter_run(path: str | Path, dataset: str, first: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``first`` to ``stop - 1`` of one Lima file, one at a time (a task's memory
    stays at one frame), a read that fails naming the file and the frames."""
    if is_image(path):
        yield from iter_image(path, first, stop)
        return
    if is_edf(path):
        yield from iter_edf(path, first, stop)
        return
    from calypso.tasks.raw.frames import named_read_errors

    with named_read_errors(f"{path}::{dataset} frames {first}-{stop - 1}"), open_lima(path) as h5:
        data = h5[dataset]
        for index in range(first, stop):
            yield data[index]


def frame_type(path: str | Path, dataset: str) -> tuple[tuple[int, ...], str]:
    """The shape and type of the frames of a Lima file being written (a RawDataError for
    one live reduction does not follow: :func:`require_followed`)."""
    require_followed(path)
    if is_image(path):
        source = _image_source(path)
        return source.frame_shape, source.dtype
    if is_edf(path):
        _written_here(Path(path))
        image = open_frames(path)
        try:
            frame = image.get_frame(0)
            return tuple(frame.shape), str(np.dtype(frame.dtype))
        finally:
            image.close()
    with open_lima(path) as h5:
        return h5[dataset].shape[1:], str(h5[dataset].dtype)


def run_source(path: str, dataset: str, frames: int, frame_shape: tuple[int, ...], dtype: str):
    """The :class:`~calypso.tasks.raw.frames.FrameSource` of the first ``frames`` frames of
    one Lima file (what a plan or a block of projections describes)."""
    from calypso.tasks.raw.frames import FrameSource

    shape = (frames, *frame_shape)
    if is_edf(path) or is_image(path):
        return FrameSource(
            kind="images", files=(path,), frames_per_file=(frames,), shape=shape, dtype=dtype
        )
    return FrameSource(kind="hdf5", files=(path,), dataset=dataset, shape=shape, dtype=dtype)


# -- growing Lima files --------------------------------------------------------------


def lima_template(raw_dataset_dir: str | Path, scan: int, detector: str) -> str:
    """Where Bliss has Lima write a scan's files: ``<dataset>/scanNNNN/<detector>_%04d.h5``."""
    return str(Path(raw_dataset_dir) / f"scan{scan:04d}" / f"{detector}_%04d.h5")


def complete_frames(data: h5py.Dataset, final: bool) -> int:
    """How many leading frames of ``data`` are wholly on disk.

    A chunked dataset: a frame counts once the chunk holding it is stored (and inside
    the dataset's current shape); a chunk of several frames only once the chunk after it
    is stored or the file is ``final`` (a writer fills a chunk frame by frame). A
    contiguous dataset says nothing of what is written: it counts only when final.
    """
    total = data.shape[0]
    if data.chunks is None:
        return total if final else 0
    per_chunk = data.chunks[0]
    rest = (0,) * (data.ndim - 1)

    def stored(chunk: int) -> bool:
        first = chunk * per_chunk
        if first >= total:
            return False
        return data.id.get_chunk_info_by_coord((first, *rest)).byte_offset is not None

    count = 0
    chunk = 0
    while count < total and stored(chunk):
        if per_chunk > 1 and not final and not stored(chunk + 1):
            break
        count = min(total, (chunk + 1) * per_chunk)
        chunk += 1
    return count
