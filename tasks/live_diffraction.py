"""Tasks of live diffraction (docs/live.md): chunks of a scan in progress, and the partial
NeXus file people can open while it runs.

A live chunk travels as the Lima files that hold its frames and its monitor values (read
by the flow from the stream or the growing dataset file). It is integrated by the same
code as an offline chunk (:func:`calypso.tasks.diffraction.integrate_into_part`), into
the same part file, so the assembled result is the offline one bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from calypso.executors.paths import worker_paths
from calypso.registry.access.landlock import confined_to_proposal
from calypso.tasks.diffraction import ChunkResult, integrate_into_part
from calypso.tasks.live_common import frames_of, partial_file
from calypso.tasks.raw.live import FileRun
from calypso.tasks.writers import nexus
from calypso.techniques.diffraction import DiffractionParameters, Geometry, radial_axis_name


# Not cached: a live chunk's frames are named by where they lie, not by what the scan
# is, and a retried live run follows the scan again from its start.
@task(name="integrate_live_chunk", cache_policy=NO_CACHE)
@worker_paths
@confined_to_proposal()
def integrate_live_chunk(
    scan: int,
    start: int,
    stop: int,
    runs: list[FileRun],
    monitor: list[float] | None,
    parameters: DiffractionParameters,
    geometry: Geometry,
    work_dir: str,
    frame_shape: tuple[int, int],
) -> ChunkResult:
    """Frames ``start:stop`` of a scan in progress (frames of ``frame_shape``), integrated
    into their part file."""
    began = time.perf_counter()
    values = None if monitor is None else np.asarray(monitor, dtype=np.float64)
    frames = frames_of(runs, frame_shape)
    return integrate_into_part(
        frames, values, parameters, geometry, scan, start, stop, work_dir, began
    )


def write_partial(
    path: Path,
    scan: int,
    detector: str,
    expected: int,
    chunks: list[ChunkResult],
    parameters: DiffractionParameters,
    state: str,
) -> None:
    """The patterns done so far, in the layout of the result (``N.1/<detector>_integrate/
    integrated``), frames not done yet NaN, marked partial (root ``status``, process
    ``status``: ``state``), written aside and renamed (:func:`partial_file`)."""
    if not chunks:
        return
    done = sorted(chunks, key=lambda c: c.start)
    total = max(expected, max(c.stop for c in done))
    with h5py.File(done[0].part_file, "r") as first:
        radial = first["radial"][()]
        pattern_shape = first["intensity"].shape[1:]
        azimuthal = first["azimuthal"][()] if "azimuthal" in first else None
    radial_name, radial_units = radial_axis_name(parameters.unit)
    with partial_file(path, f"{scan}.1") as h5:
        entry = h5.create_group(f"{scan}.1")
        nexus.set_nx_class(entry, "NXentry")
        process = entry.create_group(f"{detector}_integrate")
        nexus.set_nx_class(process, "NXprocess")
        process["status"] = state
        process["frames_done"] = sum(c.stop - c.start for c in done)
        entry.attrs["default"] = f"{detector}_integrate/integrated"
        axes = ["chi", radial_name] if azimuthal is not None else [radial_name]
        data = nexus.create_nxdata(
            process, "integrated", signal="intensity", axes=["points", *axes]
        )
        intensity = data.create_dataset(
            "intensity", shape=(total, *pattern_shape), dtype="float32", fillvalue=np.nan
        )
        for chunk in done:
            with h5py.File(chunk.part_file, "r") as part:
                intensity[chunk.start : chunk.stop] = part["intensity"][()]
        data["points"] = np.arange(total)
        if azimuthal is not None:
            nexus.write_axis(data, "chi", azimuthal, "deg")
        nexus.write_axis(data, radial_name, radial, radial_units)


@task(name="warm_up_integrator", cache_policy=NO_CACHE)
@worker_paths
@confined_to_proposal("raw")
def warm_up_integrator(
    parameters: DiffractionParameters, geometry: Geometry, raw: str | None = None
) -> float:
    """Build this worker's integrator (pyFAI's sparse matrix for these parameters and mask)
    on a blank frame while the scan has not begun, so that the first frames wait for
    nothing; seconds spent. Nothing is kept but the integrator (and the mask read, which
    the chunks then take from the worker's cache: read inside the proposal of ``raw``, as
    they would read it)."""
    from calypso.executors.worker_setup import scratch_folder
    from calypso.tasks import integrators

    began = time.perf_counter()
    with integrators.WORKER_INTEGRATORS.borrow(geometry) as integrator:
        shape = integrator.detector.shape
    if shape is None:  # a detector without a size: the first chunk builds it
        return 0.0
    monitor = None if parameters.monitor is None else np.ones(1)
    with scratch_folder("calypso-warm-up-") as folder:
        blank = np.zeros(shape, dtype=np.float32)
        integrate_into_part([blank], monitor, parameters, geometry, 0, 0, 1, folder, began)
    return time.perf_counter() - began


@confined_to_proposal()
def regroup_parts(
    chunks: list[ChunkResult], wanted: list[tuple[int, int, int]], work_dir: str
) -> list[ChunkResult]:
    """The live chunks' patterns cut again into the offline plan's chunks (``(scan, start,
    stop)``), copied row for row into new part files: the writer sums the mean pattern
    chunk by chunk, so the same chunks give the same sums to the last bit."""
    by_start = {(c.scan, c.start, c.stop): c for c in chunks}
    folder = Path(work_dir) / "offline-chunks"
    folder.mkdir(exist_ok=True)
    ordered = sorted(chunks, key=lambda c: (c.scan, c.start))
    regrouped = []
    for scan, start, stop in wanted:
        if (scan, start, stop) in by_start:
            regrouped.append(by_start[(scan, start, stop)])
            continue
        sources = [c for c in ordered if c.scan == scan and c.start < stop and c.stop > start]
        part = folder / f"scan{scan:04d}-{start:09d}.h5"
        with h5py.File(part, "w") as out:
            for name in ("intensity", "errors"):
                blocks = []
                for source in sources:
                    with h5py.File(source.part_file, "r") as h5:
                        if name not in h5:
                            break
                        lo, hi = max(start, source.start), min(stop, source.stop)
                        blocks.append(h5[name][lo - source.start : hi - source.start])
                if blocks:
                    out[name] = np.concatenate(blocks)
            with h5py.File(sources[0].part_file, "r") as h5:
                for name in ("radial", "azimuthal"):
                    if name in h5:
                        out[name] = h5[name][()]
        seconds = sum(c.seconds for c in sources)
        regrouped.append(
            ChunkResult(
                scan=scan,
                start=start,
                stop=stop,
                part_file=str(part),
                seconds=seconds,
                worker=sources[0].worker,
            )
        )
    return regrouped
