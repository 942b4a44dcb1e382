"""Lima's saving, as the acquisition simulator replays it (docs/live.md): one detector's
frames written file after file as Lima writes them, in the saving format a beamline sets.

- ``hdf5`` (Bliss's default): ``<detector>_%04d.h5`` files of ``frames_per_file`` frames,
  one chunk a frame, bitshuffle-LZ4 (the recorded chunks are copied as they are when they
  are bitshuffle-LZ4 already: replaying costs no decompression), each frame flushed once
  written; the dataset file's detector data is then a virtual dataset over them.
- ``edf``: ``<detector>_%04d.edf`` files, each frame a text header then its pixels, written
  in two parts as a writer's buffers reach the disk (a reader may find a frame begun); the
  dataset file's detector data is then an HDF5 dataset stored in the EDF files (external
  storage, one segment a frame), as Bliss's writer describes an EDF saving.
- ``cbf``, ``tiff``: one image a file, ``<detector>_%04d.cbf`` (byte-offset compressed, as
  a Pilatus saves them) or ``.tiff``, each written in two parts too; the dataset file's
  detector data is then one string a frame naming its file, ``scanNNNN/<file>::0``, as
  Bliss's writer records a saving it can neither link nor store externally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import h5py
import hdf5plugin
import numpy as np

from calypso.tasks.raw.lima_saving import LIMA_DATASET

SAVING_FORMATS = ("hdf5", "edf", "cbf", "tiff")
ONE_IMAGE_A_FILE = ("cbf", "tiff")


class LimaWriter:
    """The files of one detector of one scan, written as Lima saves them."""

    def __init__(self, folder: Path, detector: str, saving: str, shape, dtype) -> None:
        if saving not in SAVING_FORMATS:
            raise ValueError(f"saving format {saving!r}: one of {', '.join(SAVING_FORMATS)}")
        suffix = "h5" if saving == "hdf5" else saving
        self.template = str(folder / f"{detector}_%04d.{suffix}")
        self.detector, self.saving = detector, saving
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._copier = _Frames()
        self._hdf5: tuple[h5py.File, h5py.Dataset] | None = None
        self._edf: BinaryIO | None = None  # an EDF, CBF or TIFF file being written
        self._number = 0
        self.segments: list[tuple[str, int, int]] = []  # EDF: (file, offset, bytes) a frame
        self.names: list[str] = []  # CBF, TIFF: the file of each frame

    def start_file(self, number: int, count: int) -> None:
        """Lima's next file, to hold ``count`` frames."""
        path = self.template % number
        self._number = number
        if self.saving == "hdf5":
            self._hdf5 = _lima_file(path, self.detector, count, self.shape, self.dtype)
        else:
            self._edf = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by close_file)

    def write(self, where: tuple[str, str, int], slot: int) -> None:
        """The recorded frame ``where`` as frame ``slot`` of the current file, on disk."""
        if self._hdf5 is not None:
            h5, data = self._hdf5
            self._copier.copy(where, data, slot)
            h5.flush()  # a reader of growing files sees the frame now
            return
        assert self._edf is not None
        frame = np.ascontiguousarray(self._copier.read(where), dtype=self.dtype)
        name = Path(self.template % self._number)
        if self.saving in ONE_IMAGE_A_FILE:
            image = _encoded(frame, self.saving)
            self._edf.write(image[: len(image) // 2])  # the image begun: its end still to come
            self._edf.write(image[len(image) // 2 :])
            self.names.append(f"{name.parent.name}/{name.name}")
            return
        from fabio.edfimage import EdfImage

        header = {"acq_frame_nb": len(self.segments), "image_roi": "<0,0>-<0,0>"}
        block = EdfImage(data=frame, header=header).get_frame(0).get_edf_block()
        head = len(block) - frame.nbytes
        self._edf.write(block[:head])
        offset = self._edf.tell()
        half = head + frame.nbytes // 2
        self._edf.write(block[head:half])  # a frame begun: its last rows still to come
        self._edf.write(block[half:])
        self.segments.append((f"{name.parent.name}/{name.name}", offset, frame.nbytes))

    def close_file(self) -> None:
        """As Lima does once a file is full (or the scan stops)."""
        if self._hdf5 is not None:
            self._hdf5[0].close()
            self._hdf5 = None
        if self._edf is not None:
            self._edf.close()
            self._edf = None

    def close(self) -> None:
        self.close_file()
        self._copier.close()

    def detector_dataset(self, entry: h5py.Group, written: int, per_file: int) -> None:
        """The detector's data in the dataset file, as Bliss writes it at the end: a
        virtual dataset over the Lima HDF5 files, a dataset stored in the EDF files, or
        the CBF or TIFF files named frame by frame."""
        det = entry["instrument"].require_group(self.detector)  # its metadata: there
        det.attrs["NX_class"] = "NXdetector"
        if self.saving == "hdf5":
            layout = h5py.VirtualLayout(shape=(written, *self.shape), dtype=self.dtype)
            for number, first in enumerate(range(0, written, per_file)):
                count = min(per_file, written - first)
                name = Path(self.template % number)
                source = h5py.VirtualSource(
                    f"{name.parent.name}/{name.name}", LIMA_DATASET, shape=(count, *self.shape)
                )
                layout[first : first + count] = source[:count]
            det.create_virtual_dataset("data", layout, fillvalue=0)
        elif self.saving in ONE_IMAGE_A_FILE:  # named, relative to the dataset file
            det["data"] = np.array([f"{n}::0" for n in self.names[:written]], dtype=object)
        else:  # the names relative to the dataset file (HDF5_EXTFILE_PREFIX=${ORIGIN})
            det.create_dataset(
                "data", shape=(written, *self.shape), dtype=self.dtype,
                external=self.segments[:written],
            )  # fmt: skip
        det["data"].attrs["interpretation"] = "image"
        if "type" not in det:
            det["type"] = "lima"
        entry["measurement"][self.detector] = h5py.SoftLink(
            f"{entry.name}/instrument/{self.detector}/data"
        )


def _encoded(frame: np.ndarray, saving: str) -> bytes:
    """One image as a CBF (fabio's byte-offset miniCBF) or TIFF file's bytes."""
    if saving == "tiff":
        import io

        import tifffile

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, frame)
        return buffer.getvalue()
    import tempfile

    from fabio.cbfimage import CbfImage

    with tempfile.TemporaryDirectory() as folder:  # fabio writes to a file name only
        path = Path(folder) / "image.cbf"
        CbfImage(data=frame).write(str(path))
        return path.read_bytes()


def _bitshuffle(dataset: h5py.Dataset) -> bool:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [hdf5plugin.BSHUF_ID]


class _Frames:
    """Copies recorded frames into new Lima files: raw chunks when they are bitshuffle-LZ4
    frame chunks already, decoded and compressed again otherwise."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], tuple[h5py.File, h5py.Dataset]] = {}

    def _source(self, path: str, dataset: str) -> h5py.Dataset:
        key = (path, dataset)
        if key not in self._open:
            self.close()
            h5 = h5py.File(path, "r")
            self._open = {key: (h5, h5[dataset])}
        return self._open[key][1]

    def read(self, where: tuple[str, str, int]) -> np.ndarray:
        path, dataset, index = where
        return self._source(path, dataset)[index]

    def copy(self, where: tuple[str, str, int], target: h5py.Dataset, slot: int) -> None:
        path, dataset, index = where
        source = self._source(path, dataset)
        if source.chunks == target.chunks and _bitshuffle(source) and _bitshuffle(target):
            mask, chunk = source.id.read_direct_chunk((index, 0, 0))
            target.id.write_direct_chunk((slot, 0, 0), chunk, mask)
        else:
            target[slot] = source[index]

    def close(self) -> None:
        for h5, _ in self._open.values():
            h5.close()
        self._open = {}


def _lima_file(path: str, detector: str, count: int, shape, dtype) -> tuple[h5py.File, Any]:
    h5 = h5py.File(path, "w")
    entry = h5.create_group("entry_0000")
    entry.attrs["NX_class"] = "NXentry"
    data = h5.create_dataset(
        LIMA_DATASET,
        shape=(count, *shape),
        dtype=dtype,
        chunks=(1, *shape),
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )
    det = entry.create_group(f"instrument/{detector}")
    det.attrs["NX_class"] = "NXdetector"
    det["data"] = h5py.SoftLink(LIMA_DATASET)
    h5.flush()
    return h5, data
