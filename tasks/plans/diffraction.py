"""Planning a diffraction run: what to integrate, with which geometry, in which chunks.

Everything here runs before any frame is integrated, without Prefect, so the
command line can refuse bad input in a second, before starting a server or a
cluster; the flow runs the same planning again as its first task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from calypso.errors import ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.preflight import require_output_room, require_registrable
from calypso.tasks.raw import bliss, number_order
from calypso.tasks.raw.data_policy import RawDataset, output_folder
from calypso.tasks.raw.frames import (
    HDF5_SUFFIXES,
    IMAGE_SUFFIXES,
    FrameSource,
    default_image_dataset,
    eiger_data_files,
    hdf5_files_source,
    hdf5_frame_source,
    image_files_source,
    read_image,
)
from calypso.techniques.diffraction import (
    DiffractionParameters,
    Geometry,
    detector_shape,
    needs_wavelength,
    oriented_shape,
)
from calypso.techniques.masks import check_unmasked

TECHNIQUE = "diffraction"
PONI_KEYS = {"dist": "Distance", "wavelength": "Wavelength", "poni1": "Poni1", "poni2": "Poni2"}


class ScanPlan(BaseModel):
    """One scan (or image series) to integrate."""

    model_config = ConfigDict(frozen=True)

    number: int
    title: str = ""
    detector: str
    source: FrameSource
    start_time: str | None = None
    end_time: str | None = None


class Chunk(BaseModel):
    model_config = ConfigDict(frozen=True)

    scan: ScanPlan
    start: int
    stop: int


class IntegrationPlan(BaseModel):
    """Everything the flow needs, checked before any frame is integrated."""

    input: str
    raw: RawDataset | None
    raw_file: str | None
    scans: list[ScanPlan]
    geometry: Geometry
    parameters: DiffractionParameters
    output_dir: str
    output_file: str
    chunk_size: int

    @property
    def n_frames(self) -> int:
        return sum(scan.source.n_frames for scan in self.scans)

    def chunks(self) -> list[Chunk]:
        return [
            Chunk(scan=scan, start=start, stop=min(start + self.chunk_size, scan.source.n_frames))
            for scan in self.scans
            for start in range(0, scan.source.n_frames, self.chunk_size)
        ]


def load_geometry(parameters: DiffractionParameters) -> Geometry:
    """The geometry from ``parameters.geometry`` or the PONI file it names."""
    if parameters.geometry is not None:
        return parameters.geometry
    if parameters.poni is None:
        raise ParameterError(
            "no geometry: give the calibration as --set poni=FILE.poni (pyFAI PONI file)"
        )
    from pyFAI.io.ponifile import PoniFile

    path = Path(parameters.poni)
    if not path.is_file():
        raise ParameterError(f"PONI file {path} does not exist")
    try:
        config = PoniFile(_poni_entries(path)).as_dict()
        config.pop("poni_version", None)
        config["detector"] = config.get("detector") or "Detector"
        return Geometry(**config)
    except ParameterError:
        raise
    except ValidationError as exc:
        # pyFAI reads a negative distance or wavelength without a word (and drops a zero
        # wavelength): the geometry model refuses what is not physical.
        problems = "; ".join(
            f"{PONI_KEYS.get(str(e['loc'][0]), e['loc'][0])} "
            + ("is missing or 0" if e["type"] == "missing" else f"= {e['input']}: {e['msg']}")
            for e in exc.errors()
        )
        raise ParameterError(
            f"PONI file {path}: {problems}; a distance and a wavelength must be positive: fix "
            "the calibration (pyFAI-calib2) or give the right PONI file"
        ) from None
    except Exception as exc:
        raise ParameterError(
            f"PONI file {path} cannot be read ({exc}); it should be a pyFAI calibration "
            "with Distance, Poni1, Poni2, Rot1-3 and Wavelength"
        ) from None


def _poni_entries(path: Path) -> dict[str, object]:
    """A PONI file's entries as pyFAI reads them (``key: value`` lines, keys lower case,
    ``#`` comments), with a distortion spline file named relative to the PONI file's
    folder, where pyFAI-calib keeps it: pyFAI would look in the process's working
    folder, which a served run's is not."""
    entries: dict[str, object] = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            entries[key.strip().lower()] = value.strip()
    spline = entries.get("splinefile")
    if isinstance(spline, str) and spline not in ("", "None"):
        entries["splinefile"] = _spline_file(path, spline)
    config = entries.get("detector_config")
    if isinstance(config, str) and "splinefile" in config.lower():
        detector = json.loads(config)
        for key in [k for k in detector if k.lower() == "splinefile" and detector[k]]:
            detector[key] = _spline_file(path, detector[key])
        entries["detector_config"] = json.dumps(detector)
    return entries


def _spline_file(poni: Path, name: str) -> str:
    spline = (poni.parent / Path(name).expanduser()).absolute()
    if not spline.is_file():
        raise ParameterError(
            f"PONI file {poni}: its distortion spline file {name} is not at {spline}: put it "
            "beside the PONI file, or write its absolute path in the PONI file's SplineFile"
        )
    return str(spline)


def check_geometry(
    geometry: Geometry, parameters: DiffractionParameters, frame_shape: tuple[int, ...], what: str
) -> None:
    """Refuse a geometry that cannot integrate these frames in this unit: its detector of
    another shape than the frames (after ``flip``/``rotate``), or no wavelength for a unit
    computed from it."""
    where = f"PONI file {parameters.poni}" if parameters.poni else "the geometry"
    if geometry.wavelength is None and needs_wavelength(parameters.unit):
        raise ParameterError(
            f"{where} has no wavelength, and unit {parameters.unit} is computed from it: add "
            "'Wavelength: <metres>' to the calibration, or integrate in 2th_deg or r_mm "
            "(--set unit=2th_deg)"
        )
    expected = detector_shape(geometry)
    frames = oriented_shape(tuple(frame_shape[-2:]), parameters.rotate)
    if expected is not None and tuple(expected) != tuple(frames):
        rotated = f" after rotate={parameters.rotate}" if parameters.rotate else ""
        raise ParameterError(
            f"{where} is for a {geometry.detector} of {expected[0]} x {expected[1]} pixels, "
            f"but the frames of {what} are {frames[0]} x {frames[1]}{rotated}: give the "
            "calibration made for this detector (binned frames need the binning in its "
            "Detector_config)"
        )


MIN_FRAME_PIXELS = 64  # a strip detector (Mythen: 1 x 1280) is one


def checked_setup(
    parameters: DiffractionParameters, frames: FrameSource, what: str
) -> tuple[DiffractionParameters, Geometry]:
    """The parameters as a run uses them and their geometry, checked against the frames
    of ``what`` (offline and live alike): files named by absolute paths; the geometry
    (:func:`check_geometry`); mask, dark and flat of the frames' shape, the mask leaving
    enough pixels; and, for frames of unsigned integers with no ``dummy`` given, their
    type's largest value left out as pyFAI's ``dummy``: the value an Eiger writes in its
    gaps and defective pixels, and where any counter saturates (counted, a 9M Eiger's
    gaps made a vacuum frame's pattern 10^8 counts a bin)."""
    names = ("poni", "mask", "dark", "flat")
    parameters = parameters.model_copy(
        update={name: _absolute(getattr(parameters, name)) for name in names}
    )
    geometry = load_geometry(parameters)
    frame_shape = frames.frame_shape
    if frame_shape[0] * frame_shape[1] < MIN_FRAME_PIXELS:  # a PONI without a shape takes it
        raise RawDataError(
            f"{frames.describe()}: frames of {frame_shape[0]} x {frame_shape[1]} pixels are "
            "not a detector's images: is this the right file (or dataset, FILE::/path)?"
        )
    check_geometry(geometry, parameters, frame_shape, what)
    for name in names[1:]:
        location = getattr(parameters, name)
        if location is None:
            continue
        image = read_image(location, name)
        if image.shape != frame_shape:
            raise ParameterError(
                f"{name} {location} has shape {image.shape} but the detector frames are "
                f"{frame_shape}: use a {name} made for this detector"
            )
        if name == "mask":
            try:
                check_unmasked(image, parameters.min_unmasked_fraction)
            except ValueError as exc:
                raise ParameterError(
                    f"mask {location}: {exc}; fix the mask, or lower min_unmasked_fraction "
                    "if so little of the detector is meant to be used"
                ) from None
    dtype = np.dtype(frames.dtype)
    if dtype.kind == "u" and parameters.dummy is None:
        parameters = parameters.model_copy(
            update={"dummy": float(np.iinfo(dtype).max), "delta_dummy": 0.5}
        )
    return parameters, geometry


def _absolute(value: str | None) -> str | None:
    if value is None:
        return None
    if "::" in value:
        file_name, dataset = value.split("::", 1)
        return f"{Path(file_name).expanduser().absolute()}::{dataset}"
    return str(Path(value).expanduser().absolute())


def output_bytes(n_frames: int, parameters: DiffractionParameters) -> int:
    """About the disk space a run takes at its peak: the part files and the NeXus file
    they are copied into, float32 intensities (and errors) for every frame."""
    values = n_frames * parameters.npt * (parameters.npt_azim or 1)
    return 2 * 4 * values * (2 if parameters.error_model else 1)


# Frames of a chunk at most: a few seconds of work for a Pilatus 1M frame (~35 ms).
# Prefect's cost per task run is ~0.1 CPU-s between the flow's process, its server and
# the worker: 600 frames in 6 chunks of 100 took 0.5 CPU-s less of serve and the server
# than in 10 of 60, and ~4% less wall time (docs/performance.md).
MAX_CHUNK_FRAMES = 128
# What a chunk task holds of its patterns before it writes its part file (2D cakes are
# large: 2000 x 360 bins with errors, 5.8 MB a frame).
MAX_CHUNK_RESULT_BYTES = 256 * 2**20


def _default_chunk_size(n_frames: int, workers: int, frame_result_bytes: int = 0) -> int:
    # Aim for >= 2 chunks a worker (load balance) but keep each chunk several seconds of
    # work so Prefect's per-task cost stays a few percent, its patterns within
    # MAX_CHUNK_RESULT_BYTES, and never more than ~1000 tasks in one run.
    workers = max(workers, 1)
    cap = MAX_CHUNK_FRAMES
    if frame_result_bytes:
        cap = min(cap, MAX_CHUNK_RESULT_BYTES // frame_result_bytes)
    size = max(min(math.ceil(n_frames / (2 * workers)), cap), 8, math.ceil(n_frames / 1000))
    # Then as many chunks as fill every worker in each round, of equal size: 300 frames
    # in 64-frame chunks on 2 workers made 5 (3 rounds against 2), capping the speed-up
    # from 1 to 2 workers at 1.67 before anything else; 6 of 50 do not.
    chunks = math.ceil(n_frames / size)
    if chunks <= 1:
        return size  # one piece of work: one task
    rounds = math.ceil(chunks / workers)
    return math.ceil(n_frames / (rounds * workers))


def _bliss_scans(path: Path, wanted: list[int] | None, detector: str | None) -> list[ScanPlan]:
    chosen = bliss.select_scans(path, wanted)
    if not wanted:
        chosen = [info for info in chosen if info.detectors]
        if not chosen:
            raise RawDataError(f"{path}: no scan has a 2D detector (instrument/<detector>/data)")
    detector = bliss.choose_detector(path, chosen, detector)
    plans = []
    for info in chosen:
        if detector not in info.detectors:
            if wanted:
                raise RawDataError(
                    f"{path}: scan {info.number} has no detector {detector!r}; its detectors: "
                    f"{', '.join(info.detectors) or 'none'}"
                )
            continue
        bliss.require_ended(path, info)
        dataset = f"/{info.entry}/instrument/{detector}/data"
        plans.append(
            ScanPlan(
                number=info.number,
                title=info.title,
                detector=detector,
                source=hdf5_frame_source(path, dataset),
                start_time=info.start_time,
                end_time=info.end_time,
            )
        )
    if not plans:
        present = sorted({name for info in chosen for name in info.detectors})
        raise RawDataError(
            f"{path}: no scan has detector {detector!r}; its detectors: {', '.join(present)}"
        )
    return plans


def _resolve_input(
    path_text: str, scans: list[int] | None, detector: str | None
) -> tuple[RawDataset | None, Path | None, list[ScanPlan], str]:
    """What a user named: a policy dataset, a Bliss file, an HDF5 image file or images."""
    dataset_path = None
    if "::" in path_text:
        path_text, dataset_path = path_text.split("::", 1)
    path = Path(path_text).expanduser().absolute()
    if not path.exists():
        raise RawDataError(f"{path_text} does not exist")
    raw: RawDataset | None = None
    if path.is_dir():
        images = sorted(
            (p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES)), key=number_order
        )
        try:
            raw = RawDataset.from_path(path)
        except Exception as exc:
            if not images:
                raise RawDataError(
                    f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and is no raw "
                    f"dataset folder ({exc})"
                ) from None
        if raw is None:
            source = image_files_source(images)
            return None, None, [ScanPlan(number=1, detector="detector", source=source)], path.name
        bliss_file = raw.raw_file
        if not bliss_file.is_file():
            raise RawDataError(
                f"{path} is a raw dataset folder but holds no dataset file {bliss_file.name}"
            )
        path = bliss_file
    suffix = path.name.lower()
    if suffix.endswith(HDF5_SUFFIXES):
        if dataset_path is None and _is_bliss(path):
            if raw is None:
                try:
                    raw = RawDataset.from_path(path)
                except Exception:
                    raw = None
            return raw, path, _bliss_scans(path, scans, detector), path.stem
        if dataset_path is None and (parts := eiger_data_files(path)):
            # An Eiger master: the frames of all its data files, in order.
            source = hdf5_files_source(parts)
            return (
                None,
                None,
                [ScanPlan(number=1, detector="detector", source=source)],
                (path.stem.removesuffix("_master")),
            )
        dataset_path = dataset_path or default_image_dataset(path)
        source = hdf5_frame_source(path, dataset_path)
        name = dataset_path.strip("/").replace("/", "_")
        return None, None, [ScanPlan(number=1, detector=name, source=source)], path.stem
    if suffix.endswith(IMAGE_SUFFIXES):
        source = image_files_source([path])
        return (
            None,
            None,
            [ScanPlan(number=1, detector="detector", source=source)],
            path.stem.split(".")[0],
        )
    raise RawDataError(
        f"{path} is neither a raw dataset folder, a Bliss/HDF5 file nor an image "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )


def _is_bliss(path: Path) -> bool:
    with bliss.open_raw(path) as h5:
        return any(bliss.SCAN_ENTRY.match(name) for name in h5)


def make_integration_plan(
    input_path: str,
    parameters: DiffractionParameters,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    settings: CalypsoSettings | None = None,
    workers: int = 1,
) -> IntegrationPlan:
    """Check the input and parameters and decide the work, before anything runs.

    Raises
    ------
    CalypsoError
        With a message naming the file or parameter at fault.
    """
    settings = settings or CalypsoSettings()
    raw, raw_file, scan_plans, stem = _resolve_input(input_path, scans, parameters.detector)
    parameters, geometry = checked_setup(parameters, scan_plans[0].source, input_path)
    if parameters.monitor is not None:
        if raw_file is None:
            raise ParameterError("'monitor' needs a Bliss scan; image files carry no counters")
        for scan in scan_plans:
            counts = bliss.counter_lengths(raw_file, scan.number)
            if parameters.monitor not in counts:
                raise ParameterError(
                    f"{raw_file}: scan {scan.number} has no counter {parameters.monitor!r} for "
                    f"'monitor'; its counters: {', '.join(sorted(counts))}"
                )
            if counts[parameters.monitor] < scan.source.n_frames:
                raise RawDataError(
                    f"{raw_file}: scan {scan.number} has {counts[parameters.monitor]} values of "
                    f"{parameters.monitor} for {scan.source.n_frames} frames"
                )
            values = bliss.read_counter(raw_file, scan.number, parameters.monitor)
            bad = np.flatnonzero(~(np.asarray(values[: scan.source.n_frames], float) > 0))
            if len(bad):  # NaN, zero or negative: no normalisation by it
                raise RawDataError(
                    f"{raw_file}: scan {scan.number}'s monitor {parameters.monitor!r} is "
                    f"{values[bad[0]]} at frame {bad[0]}"
                    + (f" (and {len(bad) - 1} more frames)" if len(bad) > 1 else "")
                    + ": cannot normalise by it; choose another counter or drop 'monitor'"
                )
    out = output_folder(input_path, raw, TECHNIQUE, output_dir, settings.processed_data)
    if raw is not None and raw_file is not None:
        raw = raw.model_copy(update={"sample_name": bliss.read_sample_name(raw_file)})
    require_registrable(input_path, raw, str(raw_file) if raw_file else None, settings)
    n_frames = sum(scan.source.n_frames for scan in scan_plans)
    require_output_room(out, output_bytes(n_frames, parameters))
    return IntegrationPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file) if raw_file else None,
        scans=scan_plans,
        geometry=geometry,
        parameters=parameters,
        output_dir=str(out),
        output_file=str(out / f"{stem}.h5"),
        chunk_size=parameters.chunk_size
        or _default_chunk_size(n_frames, workers, output_bytes(1, parameters) // 2),
    )
