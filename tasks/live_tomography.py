"""Live tomography (docs/live.md): the projection scan of a dataset being written, its
preview once its projections cover 180 degrees, and the partial file that shows it.

The frames followed are the projections (the dataset's first projection scan, read from
its Lima files as they grow, or through blissdata); the darks and flats are those of the
scans before it, which have ended. Once the projections so far cover a half turn, one
task finds the centre of rotation and reconstructs the preview slices (the offline
``mode=preview`` code: the centre and quartile rows and a sweep of the axis) from them;
for a full-turn scan this happens half-way, and once more with every projection at the
scan's end. The result itself is the offline run's, once the dataset has ended.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import CalypsoError, RawDataError
from calypso.registry.access.landlock import confined_to_proposal
from calypso.settings import CalypsoSettings
from calypso.tasks.live_common import partial_file
from calypso.tasks.plans.tomography import TomographyPlan, plan_for_scan
from calypso.tasks.raw import bliss
from calypso.tasks.raw.bliss_projections import BlissSeries, bliss_series, scan_role
from calypso.tasks.raw.frames import FrameSource
from calypso.tasks.raw.lima_saving import open_lima, run_source
from calypso.tasks.raw.live import FileRun, counter_named
from calypso.tasks.raw.projections import ROTATION_MOTORS, FrameBlock, TomographyScan, check_scan
from calypso.tasks.tomography import (
    CenterResult,
    PreviewResult,
    find_center_of_rotation,
    reconstruct_preview,
)
from calypso.tasks.writers import nexus
from calypso.techniques import tomography as tomo

READ_AGAIN_S = 10.0  # how long a dataset file held by its writer is tried again
REFRESH_DEG = 90.0  # the preview is made again at the scan's end for this much more rotation


class LiveTomographyPlan(TomographyPlan):
    """A tomography plan the live flow follows a projection scan with: the projections are
    its frames; a live chunk is every projection not sent yet (chunk_inputs decides when)."""

    @property
    def n_frames(self) -> int:
        return self.scan.n_projections

    @property
    def chunk_size(self) -> int:
        return 1 << 30


class LivePreview(BaseModel):
    """What a live chunk gives: the preview of projections ``0:stop`` (None: they do not
    cover a half turn), the chunk being projections ``first:stop``."""

    first: int
    stop: int
    center: CenterResult | None = None
    preview: PreviewResult | None = None
    seconds: float = 0.0


def projection_scan(raw_file: Path, scans: list[int] | None) -> int | None:
    """The dataset's first projection scan (of ``scans``, when given), started or ended;
    None while there is none yet (its darks and flats are being taken)."""
    try:
        with open_lima(raw_file) as h5:
            numbers = sorted(int(n.split(".")[0]) for n in h5 if bliss.SCAN_ENTRY.match(n))
            for number in numbers:
                if scans and number not in scans:
                    continue
                entry = h5[f"{number}.1"]
                role = scan_role(entry, bliss._optional_text(entry, "title") or "")
                motors = [f"measurement/{name}" for name in ROTATION_MOTORS]
                if role == "projection" or (role == "unknown" and any(m in entry for m in motors)):
                    return number
    except (OSError, KeyError, ValueError, RuntimeError):
        return None  # not there yet, or caught between two writes
    return None


def rotation_angles(counters: dict[str, np.ndarray], motor: str | None) -> np.ndarray | None:
    """The projections' angles among a live scan's counters (degrees), None if not there."""
    for name in [motor] if motor else ROTATION_MOTORS:
        values = counter_named(counters, name)
        if values is not None:
            return np.asarray(values, dtype=np.float64).ravel()
    return None


def live_tomography_scan(
    raw_file: Path,
    parameters: tomo.TomographyParameters,
    number: int,
    detector: str,
    runs: list[FileRun],
    angles: np.ndarray,
    frame_shape: tuple[int, ...],
    dtype: str,
) -> TomographyScan:
    """The scan as far as it has come: the darks and flats of the ended scans before
    projection scan ``number``, and its projections so far (``runs``, at ``angles``).

    The dataset file may be caught while its writer holds it (as Bliss does between the
    end of a scan and the start of the next): it is read again for ``READ_AGAIN_S``."""

    def series_before() -> BlissSeries:
        before = [info for info in bliss.list_scans(raw_file) if info.number < number]
        series = bliss_series(raw_file, [i for i in before if i.complete], detector, parameters)
        series.darks = lima_blocks(raw_file, series.darks)
        series.flats = lima_blocks(raw_file, series.flats)
        return series

    deadline = time.monotonic() + READ_AGAIN_S
    while True:
        try:
            series = series_before()
            break
        except (RawDataError, OSError, KeyError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    position = series.position
    blocks = []
    for path, dataset, first, stop in runs:
        source = run_source(path, dataset, stop, frame_shape, dtype)
        blocks.append(FrameBlock(source=source, start=first, stop=stop, position=position))
        position += stop - first
    n = sum(block.n_frames for block in blocks)
    return TomographyScan(
        layout="bliss",
        description=f"{raw_file} (scans {', '.join(map(str, [*series.used, number]))}; scan "
        f"{number} in progress, {n} projections so far)",
        darks=series.darks,
        flats=series.flats,
        projections=blocks,
        angles_deg=angles[:n].tolist(),
        bliss_scans=[*series.used, number],
        detector=detector,
        entry=f"{number}.1",
    )


def lima_blocks(raw_file: Path, blocks: list[FrameBlock]) -> list[FrameBlock]:
    """The frames of ``blocks`` (virtual datasets of the dataset file) as the Lima files
    they map hold them: the tasks read those, which are closed once their scan has ended,
    not the dataset file, which its writer may hold whenever a task opens it."""
    found: list[FrameBlock] = []
    with bliss.open_raw(raw_file) as h5:
        for block in blocks:
            if block.source.kind != "hdf5":  # image files the dataset file names (CBF, TIFF)
                found.append(block)
                continue
            dataset = h5[block.source.dataset]
            if not dataset.is_virtual:
                found.append(block)
                continue
            parts = []
            for source in dataset.virtual_sources():
                path = Path(source.file_name)
                path = raw_file if source.file_name == "." else raw_file.parent / path
                (v_first, *_), _ = source.vspace.get_select_bounds()
                (s_first, *_), (s_last, *_) = source.src_space.get_select_bounds()
                frames = FrameSource(
                    kind="hdf5", files=(str(path),), dataset=source.dset_name,
                    shape=(s_last + 1, *block.source.frame_shape), dtype=block.source.dtype,
                )  # fmt: skip
                parts.append((v_first, FrameBlock(
                    source=frames, start=s_first, stop=s_last + 1,
                    position=block.position + v_first,
                )))  # fmt: skip
            found.extend(part for _, part in sorted(parts, key=lambda p: p[0]))
    return found


def make_live_tomography_plan(
    input_path: str,
    scan: TomographyScan,
    parameters: tomo.TomographyParameters,
    output_dir: str | None,
    settings: CalypsoSettings,
    workers: int,
    *,
    checked: bool,
) -> LiveTomographyPlan:
    """The plan of the projections so far, made as offline (same output file, rows,
    chunks); ``checked``: refused (RawDataError) unless they can be reconstructed."""
    from calypso.tasks.plans.tomography import _resolve_input

    raw, path = _resolve_input(input_path)
    if checked:  # the first frames' plan says where the result goes; later ones, more
        check_scan(scan, parameters)
    plan = plan_for_scan(
        input_path, raw, path, scan, parameters, output_dir, settings, workers,
        check_sampling=checked,
    )  # fmt: skip
    return LiveTomographyPlan(**dict(plan))


@task(name="warm_up_reconstruction", cache_policy=NO_CACHE)
def warm_up_reconstruction(parameters: tomo.TomographyParameters) -> float:
    """A tiny sinogram reconstructed once, while the scan has not begun: the first
    reconstruction in a worker compiles its numba kernels (seconds), which the preview
    would otherwise wait for. Its time, in seconds."""
    began = time.perf_counter()
    algorithm = "dfi" if parameters.algorithm == "dfi" else "fbp"
    angles = np.linspace(0.0, np.pi, 16, endpoint=False)
    tomo.reconstruct(
        np.ones((16, 1, 32), np.float32), angles, 15.5, algorithm=algorithm,
        filter_name=parameters.smoothing_window, circle_mask=parameters.circle_mask,
    )  # fmt: skip
    return time.perf_counter() - began


@task(name="preview_live_projections", cache_policy=NO_CACHE)
@confined_to_proposal()
def preview_live_projections(
    plan: TomographyPlan | None, first: int, stop: int, work_dir: str
) -> LivePreview:
    """The centre of rotation and the preview slices of the projections in ``plan`` (the
    first ``stop`` of the scan); none when ``plan`` is None (they cover no half turn)."""
    began = time.perf_counter()
    if plan is None:
        return LivePreview(first=first, stop=stop)
    folder = Path(work_dir) / f"live-preview-{stop}"
    folder.mkdir(parents=True, exist_ok=True)
    center = find_center_of_rotation.fn(plan)
    preview = reconstruct_preview.fn(plan, center, str(folder))
    return LivePreview(
        first=first,
        stop=stop,
        center=center,
        preview=preview,
        seconds=time.perf_counter() - began,
    )


def write_partial(path: Path, entry_name: str, result: LivePreview, state: str) -> None:
    """The partial file: the latest preview (the centre slice first, as its default), the
    centre of rotation it found, and the state."""
    import h5py

    assert result.preview is not None and result.center is not None
    with h5py.File(result.preview.part_file, "r") as part:
        slices, sweep = part["slices"][()], part["sweep"][()]
    rows = result.preview.rows
    with partial_file(path, entry_name) as h5:
        entry = h5.create_group(entry_name)
        entry.attrs["NX_class"] = "NXentry"
        entry["status"] = state
        entry["projections"] = result.stop
        cor = entry.create_dataset("center_of_rotation", data=result.center.value)
        cor.attrs["units"] = "pixel"
        cor.attrs["method"] = result.center.method
        middle = rows.index(sorted(rows)[len(rows) // 2])
        data = nexus.create_nxdata(entry, "center_slice", signal="data", axes=["y", "x"])
        data["data"] = slices[middle]
        data["data"].attrs["interpretation"] = "image"
        data.attrs["title"] = f"row {rows[middle]}, preview from {result.stop} projections"
        stack = nexus.create_nxdata(entry, "slices", signal="data", axes=["z", "y", "x"])
        stack["data"] = slices
        stack["data"].attrs["interpretation"] = "image"
        nexus.write_axis(stack, "z", np.array(rows), "pixel")
        stack = nexus.create_nxdata(
            entry, "center_of_rotation_sweep", signal="data", axes=["center", "y", "x"]
        )
        stack["data"] = sweep
        stack["data"].attrs["interpretation"] = "image"
        nexus.write_axis(stack, "center", np.array(result.preview.centers), "pixel")
        entry.attrs["default"] = "center_slice"


def mark_partial_result(output: Path, reason: str) -> None:
    """Mark a volume written from the projections that came as partial (root ``status``;
    ``status`` of its entry: "partial: ``reason``")."""
    import h5py

    with h5py.File(output, "a") as h5:
        h5.attrs["status"] = "partial"
        entry = h5[str(h5.attrs.get("default", ""))] if h5.attrs.get("default") else None
        if entry is not None:
            entry["status"] = f"partial: {reason}"


def ended_scan_numbers(raw_file: Path) -> tuple[list[int], list[int]]:
    """The scans of the dataset file that have ended, and those still running."""
    from calypso.tasks.plans.live import read_while_written

    def read(h5: Any) -> tuple[list[int], list[int]]:
        numbers = sorted(int(n.split(".")[0]) for n in h5 if bliss.SCAN_ENTRY.match(n))
        done = [n for n in numbers if "end_time" in h5[f"{n}.1"]]
        return done, [n for n in numbers if n not in done]

    try:
        return read_while_written(raw_file, read)
    except CalypsoError:
        raise RawDataError(f"{raw_file}: cannot read its scans while it is written") from None
