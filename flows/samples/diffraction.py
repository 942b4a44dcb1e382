"""Realistic sample raw data in the ESRF layout, for the demo, tests and benchmarks.

The files look like what Bliss and Lima write at a beamline: a dataset file
with one NXentry per scan whose detector data is a VDS over Lima files
compressed with bitshuffle-LZ4, counters, positioners and the sample name,
and ``end_time`` written last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fabio
import h5py
import hdf5plugin
import numpy as np

from calypso.errors import OutputError
from calypso.tasks.raw.data_policy import RawDataset


@dataclass(frozen=True)
class SampleDataset:
    """Where a generated dataset and its companion files are."""

    dataset: RawDataset
    calibration: dict[str, Path]

    @property
    def raw_dataset_dir(self) -> Path:
        return self.dataset.raw_dataset_dir


def _lima_file(
    path: Path, detector: str, shape: tuple[int, ...], dtype: str, frames: Iterable[np.ndarray]
) -> None:
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry_0000")
        entry.attrs["NX_class"] = "NXentry"
        measurement = entry.create_group("measurement")
        data = measurement.create_dataset(
            "data",
            shape=shape,
            dtype=dtype,
            chunks=(1, *shape[1:]),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        for index, frame in enumerate(frames):
            data[index] = frame
        instrument = entry.create_group("instrument")
        det = instrument.create_group(detector)
        det.attrs["NX_class"] = "NXdetector"
        det["data"] = h5py.SoftLink("/entry_0000/measurement/data")


def write_bliss_scan(
    dataset: RawDataset,
    scan: int,
    *,
    title: str,
    detector: str,
    frame_shape: tuple[int, int],
    n_frames: int,
    make_frame: Callable[[int], np.ndarray],
    counters: dict[str, np.ndarray],
    positioners: dict[str, float],
    frames_per_file: int = 100,
    dtype: str = "int32",
    exposure_s: float = 0.1,
    extra_detector: Callable[[h5py.Group, h5py.Group], None] | None = None,
) -> Path:
    """Write (or add) scan ``scan`` of a Bliss dataset, frames in Lima files.

    ``make_frame(i)`` returns frame ``i``; frames are generated and written
    one at a time so memory stays flat. ``extra_detector(instrument,
    measurement)`` adds metadata once the detector group exists.
    """
    folder = dataset.raw_dataset_dir
    lima_dir = folder / f"scan{scan:04d}"
    lima_dir.mkdir(parents=True, exist_ok=True)
    layout = h5py.VirtualLayout(shape=(n_frames, *frame_shape), dtype=dtype)
    for index, first in enumerate(range(0, n_frames, frames_per_file)):
        count = min(frames_per_file, n_frames - first)
        name = f"{detector}_{index:04d}.h5"
        frames = (make_frame(i) for i in range(first, first + count))
        _lima_file(lima_dir / name, detector, (count, *frame_shape), dtype, frames)
        source = h5py.VirtualSource(
            f"{lima_dir.name}/{name}", "/entry_0000/measurement/data", shape=(count, *frame_shape)
        )
        layout[first : first + count] = source

    def detector_group(instrument: h5py.Group, measurement: h5py.Group) -> None:
        det = instrument.create_group(detector)
        det.attrs["NX_class"] = "NXdetector"
        det.create_virtual_dataset("data", layout, fillvalue=0)
        det["data"].attrs["interpretation"] = "image"
        det["type"] = "lima"
        measurement[detector] = h5py.SoftLink(f"/{scan}.1/instrument/{detector}/data")
        if extra_detector is not None:
            extra_detector(instrument, measurement)

    return write_counter_scan(
        dataset,
        scan,
        title=title,
        counters=counters,
        positioners=positioners,
        duration_s=exposure_s * n_frames,
        extra=detector_group,
    )


def write_counter_scan(
    dataset: RawDataset,
    scan: int,
    *,
    title: str,
    counters: dict[str, np.ndarray],
    positioners: dict[str, float],
    duration_s: float,
    extra: Callable[[h5py.Group, h5py.Group], None] | None = None,
    instrument_metadata: dict[str, str] | None = None,
) -> Path:
    """Write (or add) scan ``scan`` of a Bliss dataset file: counters, positioners, sample.

    ``extra(instrument, measurement)`` adds more (a detector); ``end_time`` is
    written last, as Bliss does, to mark the scan complete.
    """
    start = datetime.now(UTC).astimezone()
    with h5py.File(dataset.raw_file, "a") as h5:
        h5.attrs["NX_class"] = "NXroot"
        h5.attrs["creator"] = "Bliss (simulated by calypso sample-data)"
        entry = h5.create_group(f"{scan}.1")
        entry.attrs["NX_class"] = "NXentry"
        entry["title"] = title
        entry["start_time"] = start.isoformat()
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        measurement = entry.create_group("measurement")
        measurement.attrs["NX_class"] = "NXcollection"
        if extra is not None:
            extra(instrument, measurement)
        for name, values in counters.items():
            counter = instrument.create_group(name)
            counter.attrs["NX_class"] = "NXdetector"
            counter["data"] = values
            measurement[name] = h5py.SoftLink(f"/{scan}.1/instrument/{name}/data")
        motors = instrument.create_group("positioners")
        motors.attrs["NX_class"] = "NXcollection"
        for name, value in positioners.items():
            motors[name] = value
        if instrument_metadata:
            group = instrument.create_group("xas")
            group.attrs["NX_class"] = "NXcollection"
            for name, value in instrument_metadata.items():
                group[name] = value
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        sample["name"] = dataset.sample_name or dataset.collection
        end = start + timedelta(seconds=duration_s)
        entry["end_time"] = end.isoformat()  # written last: marks the scan complete
    return dataset.raw_file


def sample_dataset(
    root: Path,
    collection: str,
    number: int = 1,
    *,
    proposal: str = "ih0001",
    beamline: str = "id00",
    session: str | None = None,
    reuse: bool = False,
) -> RawDataset:
    """A new raw dataset under ``root`` laid out by the data policy (``reuse``: or the one
    there). A sample never writes into a dataset that holds files already: it would rewrite
    a dataset's files under its master, which then describes frames no longer there."""
    session = session or datetime.now(UTC).strftime("%Y%m%d")
    dataset = RawDataset(
        root=Path(root).absolute(),
        proposal=proposal,
        beamline=beamline,
        session=session,
        collection=collection,
        dataset=f"{number:04d}",
        sample_name=collection,
    )
    folder = dataset.raw_dataset_dir
    if not reuse and folder.is_dir() and any(folder.iterdir()):
        raise OutputError(
            f"{folder} holds a dataset already: a sample never writes over one; give "
            "another folder (or remove that dataset if it is an earlier sample)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return dataset


def write_diffraction_sample(
    root: Path,
    frames: int = 100,
    *,
    seed: int = 0,
    dataset_number: int = 1,
    frames_per_file: int = 100,
    reuse: bool = False,
) -> SampleDataset:
    """A powder diffraction dataset: CeO2 rings on a Pilatus 1M, with its PONI and mask.
    ``reuse``: the dataset written under ``root`` by an earlier call is taken as it is
    (benchmarks' ``--data``).

    The rings are pyFAI's CeO2 calibrant simulated for the geometry written to
    the PONI file; each frame gets Poisson noise at an intensity that follows
    the ``mon`` counter, and the detector's module gaps read -1 as on a real
    Pilatus.
    """
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    dataset = sample_dataset(root, "CeO2", dataset_number, reuse=reuse)
    calibration = dataset.session_dir / "SCRIPTS" / "calibration"
    poni, mask = calibration / "pilatus1m_CeO2.poni", calibration / "pilatus1m_mask.edf"
    if reuse and dataset.raw_file.exists() and poni.exists() and mask.exists():
        return SampleDataset(dataset=dataset, calibration={"poni": poni, "mask": mask})
    detector = detector_factory("Pilatus1M")
    integrator = AzimuthalIntegrator(
        dist=0.25,
        poni1=0.092,
        poni2=0.084,
        rot1=0.012,
        rot2=-0.007,
        rot3=0.0,
        detector=detector,
        wavelength=0.7e-10,
    )
    calibrant = get_calibrant("CeO2")
    calibrant.wavelength = integrator.wavelength
    rings = calibrant.fake_calibration_image(integrator, Imax=1.0, Imin=0.0, resolution=0.03)
    background = 15.0 + 25.0 * np.exp(-integrator.array_from_unit(unit="2th_deg") / 8.0)
    expected = (background + 400.0 * rings).astype(np.float64)
    gaps = detector.mask.astype(bool)

    rng = np.random.default_rng(seed)
    reference = 1.0e5
    monitor = reference * (1.0 + 0.03 * rng.standard_normal(frames))

    def make_frame(index: int) -> np.ndarray:
        frame = np.random.default_rng((seed, index)).poisson(expected * monitor[index] / reference)
        frame = frame.astype(np.int32)
        frame[gaps] = -1
        return frame

    write_bliss_scan(
        dataset,
        1,
        title=f"loopscan {frames} 0.1",
        detector="pilatus1m",
        frame_shape=detector.shape,
        n_frames=frames,
        make_frame=make_frame,
        counters={
            "mon": monitor,
            "epoch": 1.7e9 + 0.1 * np.arange(frames),
            "elapsed_time": 0.1 * np.arange(frames),
        },
        positioners={"sx": 0.0, "sy": 1.25, "energy": 17.712},
        frames_per_file=frames_per_file,
    )
    calibration.mkdir(parents=True, exist_ok=True)
    poni.unlink(missing_ok=True)  # pyFAI appends to an existing PONI file
    integrator.save(str(poni))
    fabio.edfimage.EdfImage(data=gaps.astype(np.int8)).write(str(mask))
    return SampleDataset(dataset=dataset, calibration={"poni": poni, "mask": mask})
