"""Tasks of the MX flow: spot finding on chunks of images, indexing, NeXus report.

Chunks travel as (scan, data file, first frame, last frame); each task reads
its frames one at a time, finds the spots and writes its per-image table and
spot list to a small part file. Each worker keeps the resolution map and the
static mask of a detector once (they cost as much as a few images).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import RawDataError
from calypso.executors.paths import worker_paths
from calypso.registry.access.landlock import confined_to_proposal
from calypso.tasks.caching import CHUNK_TASK
from calypso.tasks.plans.mx import TECHNIQUE, ImageChunk, MXPlan
from calypso.tasks.raw.frames import iter_frames, read_image
from calypso.tasks.raw.mx_images import MXScan
from calypso.tasks.writers import nexus
from calypso.tasks.writers.plots import plot_mx_scan, publish_image
from calypso.techniques import mx

__all__ = [
    "TECHNIQUE",
    "ChunkSpots",
    "IndexingReport",
    "MXPlan",
    "find_spots_chunk",
    "find_spots_into_part",
    "heat_map_axes",
    "run_indexing",
    "write_grid",
    "write_mx_nexus",
]

INDEXING_PROGRAMS = ("xia2",)
INDEXING_TIMEOUT_S = 3600


class ChunkSpots(BaseModel):
    scan: int
    first_frame: int
    n_frames: int
    part_file: str
    seconds: float


class IndexingReport(BaseModel):
    program: str | None
    ran: bool
    message: str
    log_tail: str = ""


@dataclass(frozen=True)
class DetectorStatics:
    """What a worker keeps per detector: the static mask (with the resolution cut) and the
    resolution range it leaves."""

    valid: np.ndarray
    d_range: tuple[float, float]


_STATICS: dict[str, DetectorStatics] = {}


def detector_statics(scan: MXScan, parameters: mx.MXParameters) -> DetectorStatics:
    """Static mask (pixel mask, user mask, ``d_max_a`` cut), cached per worker."""
    key = json.dumps(
        [
            scan.geometry.model_dump(),
            scan.frame_shape,
            scan.pixel_mask,
            parameters.mask,
            parameters.d_max_a,
        ]
    )
    if key not in _STATICS:
        valid = np.ones(scan.frame_shape, dtype=bool)
        if scan.pixel_mask is not None:
            valid &= read_image(scan.pixel_mask, "pixel mask") == 0
        if parameters.mask is not None:
            valid &= read_image(parameters.mask, "mask") == 0
        d = scan.geometry.d_spacing_image(scan.frame_shape)
        d_max = parameters.d_max_a or float(np.nanmax(d[valid]))
        if parameters.d_max_a is not None:  # the beamstop's shadow: once, not per frame
            valid &= d < parameters.d_max_a
        _STATICS.clear()  # one detector at a time: a worker's memory stays one map
        _STATICS[key] = DetectorStatics(valid=valid, d_range=(float(np.nanmin(d[valid])), d_max))
    return _STATICS[key]


def spot_finding_keywords(parameters: mx.MXParameters) -> dict[str, Any]:
    """The parameters of :func:`~calypso.techniques.mx.find_spots`, by keyword."""
    names = ("gain", "kernel_size", "sigma_background", "sigma_strong", "global_threshold")
    names += ("min_local", "min_spot_size", "max_spot_size")
    return {name: getattr(parameters, name) for name in names}


@task(name="find_spots_chunk", **CHUNK_TASK)
@worker_paths
@confined_to_proposal()
def find_spots_chunk(chunk: ImageChunk, scan: MXScan, parameters: mx.MXParameters,
                     work_dir: str) -> ChunkSpots:  # fmt: skip
    """Find the spots of frames ``start:stop`` and store per-image values and spots."""
    began = time.perf_counter()
    source = scan.sources[chunk.source]
    part = Path(work_dir) / f"scan{chunk.scan:03d}-{chunk.first_frame:09d}.h5"
    frames = iter_frames(source, chunk.start, chunk.stop)
    return find_spots_into_part(
        frames, scan, parameters, chunk.scan, chunk.first_frame, part, began
    )


def find_spots_into_part(
    frames: Iterable[np.ndarray],
    scan: MXScan,
    parameters: mx.MXParameters,
    scan_index: int,
    first_frame: int,
    part: Path,
    began: float,
) -> ChunkSpots:
    """The spots of ``frames`` (frame ``first_frame`` of the scan first) into part file
    ``part``: the one code path of the offline chunks and of live reduction
    (tasks/live_mx.py), so both give the same values to the last bit."""
    statics = detector_statics(scan, parameters)
    table = {name: [] for name in ("n_spots", "total_intensity", "d_min", "ice_rings")}
    spots_columns: dict[str, list[np.ndarray]] = {
        name: [] for name in ("frame", "x", "y", "intensity", "size", "d")
    }
    for offset, image in enumerate(frames):
        valid = statics.valid & (image >= 0)
        if scan.saturation is not None:
            valid &= image < scan.saturation
        spots = mx.find_spots(image, valid, **spot_finding_keywords(parameters))
        summary, d = mx.summarize_image(
            spots, scan.geometry, statics.d_range, ice_ring_ratio=parameters.ice_ring_ratio
        )
        for name in table:
            table[name].append(getattr(summary, name))
        frame = first_frame + offset
        spots_columns["frame"].append(np.full(len(spots), frame))
        for name in ("x", "y", "intensity", "size"):
            spots_columns[name].append(getattr(spots, name))
        spots_columns["d"].append(d)
    with h5py.File(part, "w") as h5:
        for name, values in table.items():
            h5[name] = np.asarray(values)
        for name, values in spots_columns.items():
            h5[f"spots/{name}"] = np.concatenate(values) if values else np.zeros(0)
    return ChunkSpots(
        scan=scan_index,
        first_frame=first_frame,
        n_frames=len(table["n_spots"]),
        part_file=str(part),
        seconds=time.perf_counter() - began,
    )


@task(name="run_indexing", cache_policy=NO_CACHE)
def run_indexing(plan: MXPlan) -> IndexingReport:
    """Index and integrate a rotation scan with xia2 when it is on PATH.

    xia2 drives XDS or DIALS, which cannot be installed from PyPI; without
    them Calypso says so in the report and the rest of the run is unchanged.
    """
    if not plan.parameters.indexing:
        return IndexingReport(program=None, ran=False, message="indexing switched off")
    scan = plan.scans[0]
    if not scan.rotation:
        kind = "grid scan of stills" if scan.grid is not None else "stills (no oscillation)"
        return IndexingReport(
            program=None, ran=False, message=f"{kind}: no indexing (spot finding only)"
        )
    program = next((p for p in INDEXING_PROGRAMS if shutil.which(p)), None)
    if program is None:
        others = [p for p in ("xds_par", "xds", "dials.index") if shutil.which(p)]
        found = f" ({', '.join(others)} found: Calypso runs them through xia2)" if others else ""
        return IndexingReport(
            program=None,
            ran=False,
            message="no indexing program on PATH (xia2 with XDS or DIALS): indexing and "
            f"integration not run{found}",
        )
    folder = Path(plan.output_dir) / "xia2"
    folder.mkdir(parents=True, exist_ok=True)
    image = scan.sources[0].files[0]
    command = [shutil.which(program) or program, f"image={image}", "pipeline=dials"]
    try:
        completed = subprocess.run(
            command, cwd=folder, capture_output=True, text=True, timeout=INDEXING_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return IndexingReport(
            program=program, ran=False, message=f"{program} ran over {INDEXING_TIMEOUT_S} s"
        )
    tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-40:])
    return IndexingReport(
        program=program,
        ran=completed.returncode == 0,
        message=f"{program} exited with {completed.returncode} (work folder {folder})",
        log_tail=tail,
    )


# -- writing ----------------------------------------------------------------------


def _gather(chunks: list[ChunkSpots], n_frames: int) -> tuple[dict, dict]:
    """Per-image arrays and the concatenated spot table of one scan, in frame order."""
    table: dict[str, list] = {}
    spots: dict[str, list] = {}
    covered = 0
    for chunk in sorted(chunks, key=lambda c: c.first_frame):
        with h5py.File(chunk.part_file, "r") as part:
            for name in ("n_spots", "total_intensity", "d_min", "ice_rings"):
                table.setdefault(name, []).append(part[name][()])
            for name in part["spots"]:
                spots.setdefault(name, []).append(part[f"spots/{name}"][()])
        covered += chunk.n_frames
    if covered != n_frames:
        raise RawDataError(f"{covered} of {n_frames} images processed")
    return (
        {name: np.concatenate(values) for name, values in table.items()},
        {name: np.concatenate(values) for name, values in spots.items()},
    )


@task(name="write_mx_nexus", cache_policy=NO_CACHE)
def write_mx_nexus(
    plan: MXPlan, chunks: list[ChunkSpots], indexing: IndexingReport, provenance: dict
) -> dict:
    """The per-image table, spots, grid heat map and centring position, as NeXus and PNG."""
    p = plan.parameters
    output = Path(plan.output_file)
    png = output.with_suffix(".png")
    report: dict = {"scans": []}
    outputs = []
    with (
        nexus.atomic_outputs(png, output) as (png_temp, h5_temp),
        h5py.File(h5_temp, "w") as h5,
    ):
        nexus.write_root_attributes(h5, plan.scans[0].name)
        for index, scan in enumerate(plan.scans):
            table, spots = _gather([c for c in chunks if c.scan == index], scan.n_frames)
            entry = h5.create_group(scan.name)
            nexus.set_nx_class(entry, "NXentry")
            entry["title"] = scan.title or f"{TECHNIQUE} of {scan.description}"
            for field in ("start_time", "end_time"):
                if getattr(scan, field):
                    entry[field] = getattr(scan, field)
            if plan.raw_file is not None:
                nexus.link_raw_groups(entry, Path(plan.raw_file), scan.name, output.parent)
            hits = mx.hit_rate(table["n_spots"], p.hit_min_spots)
            scan_report = {
                "scan": scan.name,
                "images": scan.n_frames,
                "hit_rate": hits,
                "spots_per_image_median": float(np.median(table["n_spots"])),
                "ice_ring_images": int(table["ice_rings"].sum()),
                "geometry": scan.geometry.model_dump(),
                "oscillation_deg": list(scan.oscillation) if scan.oscillation else None,
            }
            process = nexus.write_process(
                entry,
                "spotfinder",
                parameters={"parameters": p.model_dump(mode="json"),
                            "geometry": scan.geometry.model_dump()},
                provenance={**provenance, "source": scan.description,
                            "indexing": indexing.model_dump()},
            )  # fmt: skip
            process["hit_rate"] = hits
            process["indexing"] = indexing.message
            _write_table(entry, table)
            _write_spots(entry, spots, scan.n_frames)
            heat = None
            if scan.grid is not None:
                heat, best = write_grid(entry, scan, table, p)
                scan_report["grid"] = list(scan.grid)
                scan_report["best_position"] = best
            entry.attrs["default"] = "grid" if heat is not None else "per_image"
            report["scans"].append(scan_report)
            outputs.append(f"{output}::/{scan.name}/{entry.attrs['default']}")
            if index == 0:
                title = f"{output.stem}, {scan.name}" + (f": {scan.title}" if scan.title else "")
                plot_mx_scan(png_temp, table["n_spots"], heat, title,
                             scan_report.get("best_position"),
                             heat_map_axes(entry.get("grid")))  # fmt: skip
    publish_image(png, f"MX: spots per image of {output.name}")
    report["indexing"] = indexing.model_dump()
    return {"outputs": outputs, "png": str(png), "report": report}


def _write_table(entry: h5py.Group, table: dict) -> None:
    data = nexus.create_nxdata(entry, "per_image", signal="n_spots", axes=["frame"])
    data.attrs["auxiliary_signals"] = ["total_intensity", "d_min", "ice_rings"]
    data["frame"] = np.arange(len(table["n_spots"]))
    data["n_spots"] = table["n_spots"].astype(np.int32)
    data["total_intensity"] = table["total_intensity"]
    data["total_intensity"].attrs["units"] = "counts"
    data["d_min"] = table["d_min"]
    data["d_min"].attrs["units"] = "angstrom"
    data["d_min"].attrs["long_name"] = "resolution reached by the best 5% of the spots (Å)"
    data["ice_rings"] = table["ice_rings"].astype(np.int8)


def _write_spots(entry: h5py.Group, spots: dict, n_frames: int) -> None:
    group = entry.create_group("spots")
    nexus.set_nx_class(group, "NXcollection")
    units = {"x": "pixel", "y": "pixel", "intensity": "counts", "size": "pixel", "d": "angstrom"}
    for name, values in spots.items():
        dataset = group.create_dataset(name, data=values)
        if name in units:
            dataset.attrs["units"] = units[name]
    frames = spots.get("frame", np.zeros(0, dtype=int)).astype(int)
    group["first"] = np.searchsorted(frames, np.arange(n_frames + 1))  # spots of frame i


def write_grid(
    entry: h5py.Group, scan: MXScan, table: dict, parameters: mx.MXParameters
) -> tuple[np.ndarray, dict]:
    """The heat map (``grid``) and the centring cell (``centring``) of a grid scan from
    its per-image ``table["n_spots"]`` (NaN for an image not processed yet: the partial
    results of live reduction); the map and the cell. ValueError: no spot anywhere."""
    assert scan.grid is not None
    heat = mx.grid_map(table["n_spots"], scan.grid, parameters.snake)
    row, column = mx.centring_position(heat)
    rows, columns = scan.grid
    frame = row * columns + (columns - 1 - column if parameters.snake and row % 2 else column)
    best = {"row": row, "column": column, "frame": int(frame), "n_spots": int(heat[row, column])}
    best.update({name: values[frame] for name, values in scan.motors.items()})
    slow, fast = _grid_motors(scan, parameters.snake)
    axes = [slow[0] if slow else "row", fast[0] if fast else "column"]
    data = nexus.create_nxdata(entry, "grid", signal="n_spots", axes=axes)
    data["n_spots"] = heat
    data["n_spots"].attrs["interpretation"] = "image"
    data["row"] = np.arange(rows)
    data["column"] = np.arange(columns)
    for motor in (slow, fast):  # the heat map on the sample's positions, where recorded
        if motor:
            data[motor[0]] = motor[1]
    centring = entry.create_group("centring")
    nexus.set_nx_class(centring, "NXcollection")
    for name, value in best.items():
        centring[name] = value
    return heat, best


def _grid_motors(
    scan: MXScan, snake: bool
) -> tuple[tuple[str, np.ndarray] | None, tuple[str, np.ndarray] | None]:
    """(name, position of each row) of the slow motor and (name, position of each column)
    of the fast one, from the positions recorded at every image; None where the scan does
    not record them (then the map stays on row and column numbers)."""
    assert scan.grid is not None
    rows, columns = scan.grid
    slow = fast = None
    for name, values in scan.motors.items():
        positions = np.asarray(values, dtype=float)
        if positions.shape != (rows * columns,) or not np.all(np.isfinite(positions)):
            continue
        grid = mx.grid_map(positions, scan.grid, snake)
        along_rows, along_columns = np.ptp(grid, axis=0).max(), np.ptp(grid, axis=1).max()
        if fast is None and along_columns > along_rows:
            fast = (name, grid.mean(axis=0))
        elif slow is None and along_rows > along_columns:
            slow = (name, grid.mean(axis=1))
    return slow, fast


def heat_map_axes(grid: h5py.Group | None) -> list[tuple[str, np.ndarray]] | None:
    """The heat map's (name, positions) of rows then columns, as written in ``grid``."""
    if grid is None:
        return None
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in grid.attrs["axes"]]
    return [(name, grid[name][()]) for name in names]
