"""Tasks of live MX (docs/live.md): spot finding on chunks of a grid scan in progress, the
partial NeXus file with the heat map and the centring cell so far, and the marks of a
result that holds only part of its scan.

A live chunk finds its spots with the code of an offline chunk
(:func:`calypso.tasks.mx.find_spots_into_part`) on the frames read from the Lima files
where they lie; the MX writer joins per-image values chunk by chunk, so the assembled
result is the offline one bit for bit whatever the chunks were.
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
from calypso.tasks.live_common import frames_of, partial_file
from calypso.tasks.mx import ChunkSpots, find_spots_into_part, heat_map_axes, write_grid
from calypso.tasks.raw.live import FileRun
from calypso.tasks.raw.mx_images import MXScan
from calypso.tasks.writers import nexus
from calypso.tasks.writers.plots import plot_mx_scan
from calypso.techniques.mx import MXParameters, grid_map

PROCESS = "spotfinder"  # the result's NXprocess, whose status a partial result sets


# Not cached: a live chunk's frames are named by where they lie, not by what the scan
# is, and a retried live run follows the scan again from its start.
@task(name="find_spots_live_chunk", cache_policy=NO_CACHE)
@worker_paths
@confined_to_proposal()
def find_spots_live_chunk(
    scan: MXScan,
    start: int,
    stop: int,
    runs: list[FileRun],
    parameters: MXParameters,
    work_dir: str,
) -> ChunkSpots:
    """The spots of frames ``start:stop`` of a scan in progress, into their part file."""
    began = time.perf_counter()
    part = Path(work_dir) / f"live-{scan.name}-{start:09d}.h5"
    frames = frames_of(runs, scan.frame_shape)
    return find_spots_into_part(frames, scan, parameters, 0, start, part, began)


@task(name="warm_up_spot_finder", cache_policy=NO_CACHE)
def warm_up_spot_finder() -> float:
    """Find the spots of a small synthetic image on this worker while the scan has not
    begun: the spot finder's imports (scipy.ndimage) and the worker's first task cost a
    second or more, which the first chunk would wait for otherwise; seconds spent."""
    from calypso.techniques.mx import find_spots

    began = time.perf_counter()
    image = np.random.default_rng(0).poisson(10.0, (64, 64))
    image[30:32, 40:42] += 400
    find_spots(image, np.ones(image.shape, dtype=bool))
    return time.perf_counter() - began


def spots_per_image(chunks: list[ChunkSpots], total: int) -> np.ndarray:
    """Spots found on each of ``total`` images so far, NaN where not done yet."""
    stop = max((c.first_frame + c.n_frames for c in chunks), default=0)
    counts = np.full(max(total, stop), np.nan)
    for chunk in chunks:
        with h5py.File(chunk.part_file, "r") as part:
            counts[chunk.first_frame : chunk.first_frame + chunk.n_frames] = part["n_spots"][()]
    return counts


def _heat_map(
    entry: h5py.Group, scan: MXScan, counts: np.ndarray, parameters: MXParameters
) -> tuple[np.ndarray, dict | None]:
    """The heat map so far (NaN: images not done) and the best cell so far, as the result
    writes them; the map alone while no image has spots (no cell: None)."""
    assert scan.grid is not None
    cells = scan.grid[0] * scan.grid[1]
    padded = np.full(cells, np.nan)
    padded[: min(cells, len(counts))] = counts[:cells]
    try:
        return write_grid(entry, scan, {"n_spots": padded}, parameters)
    except ValueError:  # no spot anywhere yet: no cell to centre on
        heat = grid_map(padded, scan.grid, parameters.snake)
        data = nexus.create_nxdata(entry, "grid", signal="n_spots", axes=["row", "column"])
        data["n_spots"] = heat
        data["n_spots"].attrs["interpretation"] = "image"
        data["row"], data["column"] = np.arange(scan.grid[0]), np.arange(scan.grid[1])
        return heat, None


def write_partial(
    path: Path,
    scan: MXScan,
    chunks: list[ChunkSpots],
    parameters: MXParameters,
    state: str,
) -> None:
    """What is known so far, in the layout of the result: ``N.1/per_image/n_spots`` and, for
    a grid scan, the heat map ``N.1/grid/n_spots`` (images not done yet NaN) and the best
    cell so far ``N.1/centring`` (row, column, frame, n_spots); marked partial (root
    ``status``; ``N.1/spotfinder/status``: ``state``, ``images_done``). Written aside and
    renamed (:func:`~calypso.tasks.live_common.partial_file`)."""
    if not chunks:
        return
    counts = spots_per_image(chunks, scan.n_frames)
    with partial_file(path, scan.name) as h5:
        entry = h5.create_group(scan.name)
        nexus.set_nx_class(entry, "NXentry")
        process = entry.create_group(PROCESS)
        nexus.set_nx_class(process, "NXprocess")
        process["status"] = state
        process["images_done"] = int(np.isfinite(counts).sum())
        process["images_expected"] = scan.n_frames
        table = nexus.create_nxdata(entry, "per_image", signal="n_spots", axes=["frame"])
        table["frame"] = np.arange(len(counts))
        table["n_spots"] = counts
        entry.attrs["default"] = "per_image"
        if scan.grid is not None:
            _heat_map(entry, scan, counts, parameters)
            entry.attrs["default"] = "grid"


def mark_partial_result(
    output: Path,
    png: Path | None,
    scan: MXScan,
    chunks: list[ChunkSpots],
    parameters: MXParameters,
    reason: str,
) -> dict | None:
    """Mark the result of a scan that did not end well (written by the offline writer from
    the images that came, ``output``) as partial: root ``status``, ``spotfinder/status``
    ("partial: ``reason``"), and for a grid scan the heat map with the cells never
    imaged NaN and the best cell among those imaged, which the quick look ``png`` shows;
    that cell (None: no grid, or no spot)."""
    counts = spots_per_image(chunks, 0)
    with h5py.File(output, "a") as h5:
        h5.attrs["status"] = "partial"
        entry = h5[scan.name]
        entry[PROCESS]["status"] = f"partial: {reason}"
        if scan.grid is None:
            return None
        heat, best = _heat_map(entry, scan, counts, parameters)
        entry.attrs["default"] = "grid"
        axes = heat_map_axes(entry["grid"])
    if png is not None:
        title = f"{output.stem}, {scan.name}: {scan.title} (partial: {reason})"
        plot_mx_scan(png, counts, heat, title, best, axes)
    return best
