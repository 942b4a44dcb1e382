"""Tasks of the diffraction flow: plan the work, integrate chunks, write NeXus.

Chunks travel as (scan, first frame, last frame); each task reads its own
frames from the raw files and writes its patterns to a small part file, so
no big array crosses the network and the flow process stays small.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import CalypsoError, RawDataError
from calypso.executors.dask import worker_identity
from calypso.executors.paths import worker_paths
from calypso.executors.worker_setup import openmp_share
from calypso.registry.access.landlock import confinement_of, in_proposal, within
from calypso.tasks import head_start, integrators
from calypso.tasks.caching import CHUNK_TASK
from calypso.tasks.plans.diffraction import (
    TECHNIQUE,
    Chunk,
    IntegrationPlan,
    ScanPlan,
)
from calypso.tasks.raw import bliss
from calypso.tasks.raw.frames import iter_frames
from calypso.tasks.writers import nexus, plots
from calypso.techniques.diffraction import (
    SETUP_LOCK,
    DiffractionParameters,
    Geometry,
    integrate_frames,
    orient,
    radial_axis_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TECHNIQUE",
    "ChunkResult",
    "IntegrationPlan",
    "integrate_chunk",
    "write_integrated_nexus",
]


class ChunkResult(BaseModel):
    scan: int
    start: int
    stop: int
    part_file: str
    seconds: float
    worker: str = ""  # where it ran: a SLURM job, or host:pid
    head_start: bool = False  # done by the command while Prefect's server started
    empty_frames: list[int] = []  # frames without one finite pixel: empty patterns


@task(name="integrate_chunk", **CHUNK_TASK)
@worker_paths
def integrate_chunk(
    chunk: Chunk,
    parameters: DiffractionParameters,
    geometry: Geometry,
    raw_file: str | None,
    work_dir: str,
) -> ChunkResult:
    """Read frames ``start:stop`` of one scan, integrate them, store the patterns in a part file."""
    inputs = (parameters, geometry, raw_file)
    taken = head_start.take(chunk, inputs, work_dir)
    if taken is not None:
        return taken  # type: ignore[return-value]  # a ChunkResult of this chunk
    # The kernel keeps what it opens inside the proposal (registry/access/landlock.py).
    return in_proposal(work_dir, _integrate_chunk, chunk, inputs, work_dir)


ChunkInputs = tuple[DiffractionParameters, Geometry, str | None]  # a chunk task's, but its chunk


def _integrate_chunk(chunk: Chunk, inputs: ChunkInputs, work_dir: str) -> ChunkResult:
    began = time.perf_counter()
    parameters, geometry, raw_file = inputs
    scan = chunk.scan
    frames = iter_frames(scan.source, chunk.start, chunk.stop)
    monitor = None
    if parameters.monitor is not None and raw_file is not None:
        monitor = bliss.read_counter(
            raw_file, scan.number, parameters.monitor, chunk.start, chunk.stop
        )
    return integrate_into_part(
        frames, monitor, parameters, geometry, scan.number, chunk.start, chunk.stop, work_dir, began
    )


def integrate_into_part(
    frames: Iterable[np.ndarray],
    monitor: np.ndarray | None,
    parameters: DiffractionParameters,
    geometry: Geometry,
    scan_number: int,
    start: int,
    stop: int,
    work_dir: str,
    began: float,
) -> ChunkResult:
    """Integrate frames ``start:stop`` of scan ``scan_number`` into their part file: the one
    code path of the offline chunks and of live reduction (tasks/live_diffraction.py)."""
    images = {
        name: integrators.detector_image(getattr(parameters, name), name)
        for name in ("mask", "dark", "flat")
        if getattr(parameters, name) is not None
    }
    p = parameters
    empty: list[int] = []
    with (
        openmp_share() as pace,
        integrators.WORKER_INTEGRATORS.borrow(geometry) as integrator,
    ):
        result = integrate_frames(
            _paced(_noting_empty(frames, start, empty), pace),
            integrator,
            npt=p.npt,
            npt_azim=p.npt_azim,
            unit=p.unit,
            method=p.method,
            error_model=p.error_model,
            polarization_factor=p.polarization_factor,
            correct_solid_angle=p.correct_solid_angle,
            radial_range=p.radial_range,
            azimuth_range=p.azimuth_range,
            dummy=p.dummy,
            delta_dummy=p.delta_dummy,
            flip=p.flip,
            rotate=p.rotate,
            monitor=monitor,
            monitor_reference=p.monitor_reference,
            monitor_name=p.monitor,
            **images,
        )
    part = Path(work_dir) / f"scan{scan_number:04d}-{start:09d}.h5"
    with h5py.File(part, "w") as h5:
        h5["intensity"] = result.intensity
        if result.errors is not None:
            h5["errors"] = result.errors
        h5["radial"] = result.radial
        if result.azimuthal is not None:
            h5["azimuthal"] = result.azimuthal
    return ChunkResult(
        scan=scan_number,
        start=start,
        stop=stop,
        part_file=str(part),
        seconds=time.perf_counter() - began,
        worker=worker_identity(),
        empty_frames=empty,
    )


def _noting_empty(
    frames: Iterable[np.ndarray], first: int, empty: list[int]
) -> Iterator[np.ndarray]:
    """``frames``; the numbers of those without one finite pixel (a beam dump written as
    NaN) added to ``empty``: pyFAI gives them a pattern of zeros, which must not pass
    unsaid."""
    for number, frame in enumerate(frames, first):
        if frame.dtype.kind == "f" and not np.isfinite(frame).any():
            empty.append(number)
        yield frame


def _paced(frames: Iterable[np.ndarray], pace: Callable[[], None]) -> Iterator[np.ndarray]:
    """``frames``, each read and integrated with this thread's share of the cores then."""
    for frame in frames:
        pace()
        yield frame


def plan_head_start(plan: IntegrationPlan) -> head_start.HeadStart:
    """The plan's chunks integrated in one thread of the command while Prefect's server
    starts (:mod:`calypso.tasks.head_start`)."""
    inputs: ChunkInputs = (plan.parameters, plan.geometry, plan.raw_file)
    # Confined as the chunk tasks are, to the proposal and its staging folder.
    confinement = confinement_of(plan.output_dir)

    def integrate(chunk: Chunk, folder: str) -> ChunkResult:
        confined = confinement and confinement.and_writable(folder)
        return within(confined, _integrate_chunk, chunk, inputs, folder)

    return head_start.HeadStart(
        integrate,
        plan.chunks(),
        key=lambda chunk: chunk.model_dump_json(),
        inputs=inputs,
    )


def ascii_path(plan: IntegrationPlan, scan: ScanPlan) -> Path:
    stem = Path(plan.output_file).stem
    return Path(plan.output_dir) / f"{stem}_{scan.number:04d}_{scan.detector}.xy"


@task(name="write_integrated_nexus", cache_policy=NO_CACHE)
def write_integrated_nexus(
    plan: IntegrationPlan, results: list[ChunkResult], provenance: dict, partial: str | None = None
) -> list[str]:
    """Assemble the part files into the NeXus result (and one ASCII pattern a scan), atomically.

    ``partial`` (live reduction of a scan that did not end well: why) marks the result
    partial, at the root (``status``) and in each process (``status``); without it the
    file is what it always was.

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
    curves = []
    first_average: ScanAverage | None = None
    png = quick_look_path(plan)
    with nexus.atomic_outputs(*ascii_files, png, output) as temporaries:
        *ascii_temps, png_temp, h5_temp = temporaries
        with h5py.File(h5_temp, "w") as h5:
            nexus.write_root_attributes(h5, f"{plan.scans[0].number}.1")
            if partial:
                h5.attrs["status"] = "partial"
            for index, scan in enumerate(plan.scans):
                entry_name = f"{scan.number}.1"
                entry = h5.create_group(entry_name)
                nexus.set_nx_class(entry, "NXentry")
                entry["title"] = scan.title or f"{TECHNIQUE} of {scan.source.describe()}"
                for name in ("start_time", "end_time"):
                    if getattr(scan, name):
                        entry[name] = getattr(scan, name)
                if plan.raw_file is not None:
                    nexus.link_raw_groups(
                        entry, Path(plan.raw_file), entry_name, output_dir, expand=("measurement",)
                    )
                process_name = f"{scan.detector}_integrate"
                entry.attrs["default"] = f"{process_name}/integrated"
                process = nexus.write_process(
                    entry,
                    process_name,
                    parameters=parameters,
                    provenance={**provenance, "source": scan.source.describe()},
                )
                process.attrs["default"] = "integrated"
                if partial:
                    process["status"] = f"partial: {partial}"
                chunks = by_scan.get(scan.number, [])
                covered = sum(c.stop - c.start for c in chunks)
                if covered != scan.source.n_frames:
                    raise RawDataError(
                        f"scan {scan.number}: {covered} of {scan.source.n_frames} frames integrated"
                    )
                average = _copy_parts(
                    process, chunks, scan.source.n_frames, radial_name, radial_units
                )
                urls.append(f"{output}::/{entry_name}/{process_name}/integrated")
                # Where ewoksxrpd puts it, so that its users' scripts read Calypso's files.
                measurement = entry.require_group("measurement")
                nexus.set_nx_class(measurement, "NXcollection")
                measurement[f"{scan.detector}_integrated"] = h5py.SoftLink(
                    f"/{entry_name}/{process_name}/integrated/intensity"
                )
                if index == 0:
                    first_average = average
                if write_ascii:
                    _write_ascii(ascii_temps[index], average, plan, scan, radial_name)
                    curves.append((f"scan {scan.number}", average.radial, average.intensity))
        if curves:
            plots.plot_diffraction(
                png_temp, curves, f"{radial_name} ({radial_units})",
                f"{output.stem}: {plan.scans[0].title or f'scan {plan.scans[0].number}'}",
                **_quick_look_of_first_scan(plan, first_average),
            )  # fmt: skip
    if curves:
        plots.publish_image(png, f"Diffraction: mean pattern of {output.name}")
    return urls


def quick_look_path(plan: IntegrationPlan) -> Path:
    """The PNG of the mean patterns (1D integration only), next to the NeXus file."""
    return Path(plan.output_file).with_suffix(".png")


@dataclass(frozen=True)
class ScanAverage:
    """Mean pattern of a scan (and its propagated error), accumulated chunk by chunk."""

    radial: np.ndarray
    azimuthal: np.ndarray | None
    intensity: np.ndarray
    errors: np.ndarray | None
    frames_map: np.ndarray | None = None  # 1D: frames averaged into <= MAP_ROWS rows


def _copy_parts(
    process: h5py.Group,
    chunks: list[ChunkResult],
    n_frames: int,
    radial_name: str,
    radial_units: str,
) -> ScanAverage:
    """Copy the chunks' part files into ``integrated``, one at a time, and average them."""
    with h5py.File(chunks[0].part_file, "r") as first:
        radial = first["radial"][()]
        azimuthal = first["azimuthal"][()] if "azimuthal" in first else None
        pattern_shape = first["intensity"].shape[1:]
        dtype = first["intensity"].dtype
        has_errors = "errors" in first
    pattern_axes = ["chi", radial_name] if azimuthal is not None else [radial_name]
    data = nexus.create_nxdata(
        process, "integrated", signal="intensity", axes=["points", *pattern_axes]
    )
    intensity = data.create_dataset("intensity", shape=(n_frames, *pattern_shape), dtype=dtype)
    intensity.attrs["interpretation"] = "spectrum" if azimuthal is None else "image"
    errors = None
    if has_errors:
        errors = data.create_dataset(
            "intensity_errors", shape=(n_frames, *pattern_shape), dtype=dtype
        )
    data["points"] = np.arange(n_frames)
    _write_pattern_axes(data, radial, azimuthal, radial_name, radial_units)
    total = np.zeros(pattern_shape, dtype=np.float64)
    total_variance = np.zeros(pattern_shape, dtype=np.float64)
    # The quick look's image of every frame, averaged into at most MAP_ROWS rows as the
    # parts go by: its memory does not grow with the scan.
    rows = min(n_frames, MAP_ROWS) if azimuthal is None else 0
    map_sum = np.zeros((rows, *pattern_shape))
    map_count = np.zeros(rows)
    for chunk in chunks:
        with h5py.File(chunk.part_file, "r") as part:
            block = part["intensity"][()]
            intensity[chunk.start : chunk.stop] = block
            total += np.nansum(block, axis=0)
            if rows:
                into = np.arange(chunk.start, chunk.stop) * rows // n_frames
                _add_rows_in_order(map_sum, map_count, into, np.nan_to_num(block))
            if errors is not None:
                block_errors = part["errors"][()]
                errors[chunk.start : chunk.stop] = block_errors
                total_variance += np.nansum(block_errors.astype(np.float64) ** 2, axis=0)
    average = ScanAverage(
        radial=radial,
        azimuthal=azimuthal,
        intensity=total / n_frames,
        errors=np.sqrt(total_variance) / n_frames if has_errors else None,
        frames_map=map_sum / np.maximum(map_count, 1)[:, None] if rows else None,
    )
    group = nexus.create_nxdata(process, "average", signal="intensity", axes=pattern_axes)
    group["intensity"] = average.intensity
    if average.errors is not None:
        group["intensity_errors"] = average.errors
    _write_pattern_axes(group, radial, azimuthal, radial_name, radial_units)
    return average


def _add_rows_in_order(
    sums: np.ndarray, counts: np.ndarray, into: np.ndarray, rows: np.ndarray
) -> None:
    """``sums[into[i]] += rows[i]`` (and ``counts[into[i]] += 1``) for every ``i`` in
    order, ``into`` sorted: what ``np.add.at`` does, the same to the bit, in a few
    vectorised passes (the k-th row of every run of equal ``into`` in pass k, so each
    pass adds to distinct rows). ``np.add.at`` took ~0.05 s of a 600-frame write."""
    if not len(into):
        return
    starts = np.flatnonzero(np.diff(into, prepend=into[0] - 1))
    lengths = np.diff(starts, append=len(into))
    within = np.arange(len(into)) - np.repeat(starts, lengths)
    for k in range(int(lengths.max())):
        chosen = np.flatnonzero(within == k)
        sums[into[chosen]] += rows[chosen]
        counts[into[chosen]] += 1


def _write_pattern_axes(
    group: h5py.Group,
    radial: np.ndarray,
    azimuthal: np.ndarray | None,
    radial_name: str,
    radial_units: str,
) -> None:
    if azimuthal is not None:
        nexus.write_axis(group, "chi", azimuthal, "deg")
    nexus.write_axis(group, radial_name, radial, radial_units)


def _write_ascii(
    path: Path, average: ScanAverage, plan: IntegrationPlan, scan: ScanPlan, radial_name: str
) -> None:
    g, p = plan.geometry, plan.parameters
    header = [
        f"Calypso diffraction: average of {scan.source.n_frames} frames",
        f"source: {scan.source.describe()}",
        f"scan: {scan.number}  detector: {scan.detector}",
        f"geometry: dist={g.dist} m poni1={g.poni1} m poni2={g.poni2} m rot1={g.rot1} "
        f"rot2={g.rot2} rot3={g.rot3} rad "
        + (f"wavelength={g.wavelength} m " if g.wavelength else "wavelength unknown ")
        + f"detector={g.detector}",
        f"unit: {p.unit}  method: {'_'.join(p.method)}",
        f"monitor: {p.monitor or 'none'}  reference: {p.monitor_reference}",
        f"columns: {radial_name} intensity" + (" sigma" if average.errors is not None else ""),
    ]
    columns = [average.radial, average.intensity]
    if average.errors is not None:
        columns.append(average.errors)
    np.savetxt(path, np.column_stack(columns), header="\n".join(header), fmt="%.8g")


MAP_ROWS = 400  # rows of the quick look's image of every frame
RINGS = 6  # rings drawn over the quick look's frame: the strongest peaks of the mean pattern


def _quick_look_of_first_scan(plan: IntegrationPlan, average: ScanAverage | None) -> dict:
    """The quick look's image of every frame, and its middle frame as the integration saw
    it (oriented), with the mask and the rings the geometry puts at the mean pattern's
    strongest peaks. Best effort: a quick look never fails a run."""
    if average is None or average.azimuthal is not None:
        return {}
    scan = plan.scans[0]
    look: dict = {"frames_map": average.frames_map, "n_frames": scan.source.n_frames}
    p = plan.parameters
    try:
        from scipy.signal import find_peaks

        middle = scan.source.n_frames // 2
        frame = orient(next(iter_frames(scan.source, middle, middle + 1)), p.flip, p.rotate)
        mask = None
        if p.mask is not None:
            mask = orient(integrators.detector_image(p.mask, "mask"), p.flip, p.rotate)
        with integrators.WORKER_INTEGRATORS.borrow(plan.geometry) as integrator, SETUP_LOCK:
            radial_map = integrator.array_from_unit(shape=frame.shape, unit=p.unit, scale=True)
        mean = np.nan_to_num(average.intensity)
        peaks, found = find_peaks(mean, prominence=0.02 * (mean.max() - mean.min() or 1))
        strongest = peaks[np.argsort(found["prominences"])[::-1][:RINGS]]
        look |= {
            "frame": np.asarray(frame, dtype=np.float32),
            "mask": mask,
            "radial_map": radial_map,
            "rings": average.radial[strongest],
        }
    except (PermissionError, CalypsoError):  # the raw data changed since the chunks read it
        raise  # (a file swapped for another proposal's, which the kernel refused to open)
    except Exception:  # the quick look is a convenience: the results are written anyway
        logger.warning("quick look: the frame with its rings was left out", exc_info=True)
    return look
