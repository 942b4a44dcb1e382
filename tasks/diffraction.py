"""Tasks of the diffraction flow: plan the work, integrate chunks, write NeXus.

Chunks travel as (scan, first frame, last frame); each task reads its own
frames from the raw files and writes its patterns to a small part file, so
no big array crosses the network and the flow process stays small.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from calypso.errors import ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks import bliss, nexus
from calypso.tasks.data_policy import RawDataset
from calypso.tasks.frames import (
    HDF5_SUFFIXES,
    IMAGE_SUFFIXES,
    FrameSource,
    default_image_dataset,
    hdf5_frame_source,
    image_files_source,
    iter_frames,
    read_image,
)
from calypso.techniques.diffraction import (
    DiffractionParameters,
    Geometry,
    IntegratorCache,
    integrate_frames,
    radial_axis_name,
)

TECHNIQUE = "diffraction"
# Each worker process keeps its integrators: pyFAI's sparse matrix is built once
# per geometry and reused for every chunk that worker integrates.
WORKER_INTEGRATORS = IntegratorCache()


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


class ChunkResult(BaseModel):
    scan: int
    start: int
    stop: int
    part_file: str
    seconds: float


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
        config = PoniFile(str(path)).as_dict()
        config.pop("poni_version", None)
        config["detector"] = config.get("detector") or "Detector"
        return Geometry(**config)
    except Exception as exc:
        raise ParameterError(
            f"PONI file {path} cannot be read ({exc}); it should be a pyFAI calibration "
            "with Distance, Poni1, Poni2, Rot1-3 and Wavelength"
        ) from None


def _absolute(value: str | None) -> str | None:
    if value is None:
        return None
    if "::" in value:
        file_name, dataset = value.split("::", 1)
        return f"{Path(file_name).expanduser().absolute()}::{dataset}"
    return str(Path(value).expanduser().absolute())


def _default_chunk_size(n_frames: int, workers: int) -> int:
    # Aim for >= 2 chunks a worker (load balance) but keep each chunk near a
    # second or more of work so Prefect's per-task cost stays a few percent,
    # and never more than ~1000 tasks in one run.
    size = math.ceil(n_frames / (2 * max(workers, 1)))
    return max(min(size, 64), 8, math.ceil(n_frames / 1000))


def _bliss_scans(path: Path, wanted: list[int] | None, detector: str | None) -> list[ScanPlan]:
    infos = bliss.list_scans(path)
    by_number = {info.number: info for info in infos}
    if wanted:
        missing = [n for n in wanted if n not in by_number]
        if missing:
            raise RawDataError(
                f"{path} has no scan {', '.join(map(str, missing))}; "
                f"its scans are {', '.join(map(str, by_number))}"
            )
        chosen = [by_number[n] for n in wanted]
    else:
        chosen = [info for info in infos if info.detectors]
        if not chosen:
            raise RawDataError(f"{path}: no scan has a 2D detector (instrument/<detector>/data)")
    if detector is None:
        names = sorted({name for info in chosen for name in info.detectors})
        if len(names) != 1:
            raise ParameterError(
                f"{path}: no 2D detector in the chosen scans"
                if not names
                else f"{path}: several 2D detectors ({', '.join(names)}): "
                "choose one with --set detector=NAME"
            )
        detector = names[0]
    plans = []
    for info in chosen:
        if detector not in info.detectors:
            if wanted:
                raise RawDataError(
                    f"{path}: scan {info.number} has no detector {detector!r}; its detectors: "
                    f"{', '.join(info.detectors) or 'none'}"
                )
            continue
        if not info.complete:
            raise RawDataError(
                f"{path}: scan {info.number} has no end_time, so Bliss is still writing it; "
                "run again once the scan has finished"
            )
        dataset = f"/{info.entry}/instrument/{detector}/data"
        bliss.require_frames(path, dataset)
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
        images = sorted(p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
        try:
            raw = RawDataset.from_path(path)
        except Exception:
            if not images:
                raise
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
    parameters = parameters.model_copy(
        update={
            name: _absolute(getattr(parameters, name)) for name in ("poni", "mask", "dark", "flat")
        }
    )
    raw, raw_file, scan_plans, stem = _resolve_input(input_path, scans, parameters.detector)
    geometry = load_geometry(parameters)
    frame_shape = scan_plans[0].source.frame_shape
    for name in ("mask", "dark", "flat"):
        location = getattr(parameters, name)
        if location is not None:
            image = read_image(location, name)
            if image.shape != frame_shape:
                raise ParameterError(
                    f"{name} {location} has shape {image.shape} but the detector frames are "
                    f"{frame_shape}: use a {name} made for this detector"
                )
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
    if output_dir is not None:
        out = Path(output_dir).expanduser().absolute()
    elif raw is not None:
        out = raw.processed_dataset_dir(TECHNIQUE, settings.processed_data)
    else:
        raise ParameterError(
            f"{input_path} is not a raw dataset of the data policy (…/RAW_DATA/<collection>/"
            "<collection>_<dataset>), so there is no PROCESSED_DATA folder to write to: "
            "give --output DIR"
        )
    if raw is not None and raw_file is not None:
        raw = raw.model_copy(update={"sample_name": bliss.read_sample_name(raw_file)})
    n_frames = sum(scan.source.n_frames for scan in scan_plans)
    return IntegrationPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file) if raw_file else None,
        scans=scan_plans,
        geometry=geometry,
        parameters=parameters,
        output_dir=str(out),
        output_file=str(out / f"{stem}.h5"),
        chunk_size=parameters.chunk_size or _default_chunk_size(n_frames, workers),
    )


@task(name="plan_integration", cache_policy=NO_CACHE)
def plan_integration(
    input_path: str,
    parameters: DiffractionParameters,
    scans: list[int] | None,
    output_dir: str | None,
    workers: int,
) -> IntegrationPlan:
    """Check the raw data, geometry and parameters; split the frames into chunks."""
    return make_integration_plan(input_path, parameters, scans, output_dir, workers=workers)


@task(name="integrate_chunk", cache_policy=NO_CACHE)
def integrate_chunk(
    chunk: Chunk,
    parameters: DiffractionParameters,
    geometry: Geometry,
    raw_file: str | None,
    work_dir: str,
) -> ChunkResult:
    """Read frames ``start:stop`` of one scan, integrate them, store the patterns in a part file."""
    began = time.perf_counter()
    scan = chunk.scan
    frames = iter_frames(scan.source, chunk.start, chunk.stop)
    monitor = None
    if parameters.monitor is not None and raw_file is not None:
        monitor = bliss.read_counter(
            raw_file, scan.number, parameters.monitor, chunk.start, chunk.stop
        )
    images = {
        name: read_image(getattr(parameters, name), name)
        for name in ("mask", "dark", "flat")
        if getattr(parameters, name) is not None
    }
    result = integrate_frames(
        frames, WORKER_INTEGRATORS.get(geometry), parameters, monitor=monitor, **images
    )
    part = Path(work_dir) / f"scan{scan.number:04d}-{chunk.start:09d}.h5"
    with h5py.File(part, "w") as h5:
        h5["intensity"] = result.intensity
        if result.errors is not None:
            h5["errors"] = result.errors
        h5["radial"] = result.radial
        if result.azimuthal is not None:
            h5["azimuthal"] = result.azimuthal
    return ChunkResult(
        scan=scan.number,
        start=chunk.start,
        stop=chunk.stop,
        part_file=str(part),
        seconds=time.perf_counter() - began,
    )


def new_work_dir(plan: IntegrationPlan) -> Path:
    """A hidden scratch folder beside the output for the chunks' part files."""
    work = Path(plan.output_dir) / f"{nexus.PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    return work


def remove_work_dir(work_dir: str | Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


def ascii_path(plan: IntegrationPlan, scan: ScanPlan) -> Path:
    stem = Path(plan.output_file).stem
    return Path(plan.output_dir) / f"{stem}_{scan.number:04d}_{scan.detector}.xy"


@task(name="write_integrated_nexus", cache_policy=NO_CACHE)
def write_integrated_nexus(
    plan: IntegrationPlan, results: list[ChunkResult], provenance: dict
) -> list[str]:
    """Assemble the part files into the NeXus result (and one ASCII pattern a scan), atomically.

    Returns the NeXus URLs of the integrated data, one per scan.
    """
    p = plan.parameters
    by_scan: dict[int, list[ChunkResult]] = {}
    for result in sorted(results, key=lambda r: (r.scan, r.start)):
        by_scan.setdefault(result.scan, []).append(result)
    output = Path(plan.output_file)
    output_dir = Path(plan.output_dir)
    write_ascii = p.npt_azim is None
    ascii_files = [ascii_path(plan, scan) for scan in plan.scans] if write_ascii else []
    radial_name, radial_units = radial_axis_name(p.unit)
    parameters = {
        "parameters": p.model_dump(mode="json"),
        "geometry": plan.geometry.model_dump(mode="json"),
    }
    urls = []
    with nexus.atomic_outputs(*ascii_files, output) as temporaries:
        *ascii_temps, h5_temp = temporaries
        with h5py.File(h5_temp, "w") as h5:
            nexus.write_root_attributes(h5, f"{plan.scans[0].number}.1")
            for index, scan in enumerate(plan.scans):
                entry_name = f"{scan.number}.1"
                entry = h5.create_group(entry_name)
                nexus.set_nx_class(entry, "NXentry")
                entry["title"] = scan.title or f"{TECHNIQUE} of {scan.source.describe()}"
                for name in ("start_time", "end_time"):
                    if getattr(scan, name):
                        entry[name] = getattr(scan, name)
                if plan.raw_file is not None:
                    nexus.link_raw_groups(entry, Path(plan.raw_file), entry_name, output_dir)
                process_name = f"{scan.detector}_integrate"
                entry.attrs["default"] = f"{process_name}/integrated"
                process = nexus.write_process(
                    entry,
                    process_name,
                    parameters=parameters,
                    provenance={**provenance, "source": scan.source.describe()},
                )
                process.attrs["default"] = "integrated"
                chunks = by_scan.get(scan.number, [])
                covered = sum(c.stop - c.start for c in chunks)
                if covered != scan.source.n_frames:
                    raise RawDataError(
                        f"scan {scan.number}: {covered} of {scan.source.n_frames} frames integrated"
                    )
                mean, mean_errors = _copy_parts(process, chunks, scan, p, radial_name, radial_units)
                urls.append(f"{output}::/{entry_name}/{process_name}/integrated")
                if write_ascii:
                    _write_ascii(ascii_temps[index], mean, mean_errors, plan, scan, radial_name)
    return urls


def _copy_parts(process, chunks, scan, p, radial_name, radial_units):
    n = scan.source.n_frames
    with h5py.File(chunks[0].part_file, "r") as first:
        radial = first["radial"][()]
        azimuthal = first["azimuthal"][()] if "azimuthal" in first else None
        pattern_shape = first["intensity"].shape[1:]
        dtype = first["intensity"].dtype
        has_errors = "errors" in first
    axes = ["points", "chi", radial_name] if azimuthal is not None else ["points", radial_name]
    data = nexus.create_nxdata(process, "integrated", signal="intensity", axes=axes)
    intensity = data.create_dataset("intensity", shape=(n, *pattern_shape), dtype=dtype)
    intensity.attrs["interpretation"] = "spectrum" if azimuthal is None else "image"
    errors = (
        data.create_dataset("intensity_errors", shape=(n, *pattern_shape), dtype=dtype)
        if has_errors
        else None
    )
    data["points"] = np.arange(n)
    if azimuthal is not None:
        nexus.write_axis(data, "chi", azimuthal, "deg")
    nexus.write_axis(data, radial_name, radial, radial_units)
    total = np.zeros(pattern_shape, dtype=np.float64)
    total_variance = np.zeros(pattern_shape, dtype=np.float64)
    for chunk in chunks:
        with h5py.File(chunk.part_file, "r") as part:
            block = part["intensity"][()]
            intensity[chunk.start : chunk.stop] = block
            total += np.nansum(block, axis=0)
            if errors is not None:
                block_errors = part["errors"][()]
                errors[chunk.start : chunk.stop] = block_errors
                total_variance += np.nansum(block_errors.astype(np.float64) ** 2, axis=0)
    mean = total / n
    mean_errors = np.sqrt(total_variance) / n if has_errors else None
    average = nexus.create_nxdata(process, "average", signal="intensity", axes=axes[1:])
    average["intensity"] = mean
    if mean_errors is not None:
        average["intensity_errors"] = mean_errors
    if azimuthal is not None:
        nexus.write_axis(average, "chi", azimuthal, "deg")
    nexus.write_axis(average, radial_name, radial, radial_units)
    return (radial, mean), mean_errors


def _write_ascii(path: Path, mean, mean_errors, plan: IntegrationPlan, scan: ScanPlan, radial_name):
    radial, intensity = mean
    g = plan.geometry
    header = [
        f"Calypso diffraction: average of {scan.source.n_frames} frames",
        f"source: {scan.source.describe()}",
        f"scan: {scan.number}  detector: {scan.detector}",
        f"geometry: dist={g.dist} m poni1={g.poni1} m poni2={g.poni2} m rot1={g.rot1} "
        f"rot2={g.rot2} rot3={g.rot3} rad wavelength={g.wavelength} m detector={g.detector}",
        f"unit: {plan.parameters.unit}  method: {'_'.join(plan.parameters.method)}",
        f"monitor: {plan.parameters.monitor or 'none'}  "
        f"reference: {plan.parameters.monitor_reference}",
        "columns: " + f"{radial_name} intensity" + (" sigma" if mean_errors is not None else ""),
    ]
    columns = [radial, intensity] + ([mean_errors] if mean_errors is not None else [])
    np.savetxt(path, np.column_stack(columns), header="\n".join(header), fmt="%.8g")
