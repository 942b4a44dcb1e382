"""Tasks of the tomography flow: centre of rotation, slabs of slices, NeXus volume.

Slabs travel as row ranges; each task reads its detector rows of every
projection straight from the raw files, prepares the sinograms, reconstructs
them and writes its slices to a slab file. The NeXus file maps the slab
files into one virtual dataset (VDS), so the volume is never gathered in one
process and the writer's memory does not grow with it.
"""

from __future__ import annotations

import time
from pathlib import Path

# Imported here, not lazily in the technique, so that Dask workers, which
# preload this module when they start, do not pay algotom's and numba's ~2 s
# import inside their first task.
import algotom.prep.calculation
import algotom.prep.removal
import algotom.rec.reconstruction  # noqa: F401
import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import OutputError, RawDataError
from calypso.executors.paths import worker_paths
from calypso.registry.access.landlock import confined_to_proposal
from calypso.tasks.caching import CHUNK_TASK
from calypso.tasks.plans.tomography import TECHNIQUE, TomographyPlan
from calypso.tasks.raw.projections import flat_series_rows, mean_rows, read_projection_rows
from calypso.tasks.writers import nexus
from calypso.tasks.writers.plots import plot_slices, publish_image
from calypso.tasks.writers.publication import move_into_place
from calypso.techniques import tomography as tomo


def warm_up_worker() -> None:
    """Compile the back-projection kernel (~0.5 s) as a worker starts, so the first slab
    does not wait for it (:func:`calypso.executors.worker_setup.dask_setup`). Not at
    import: a kept cluster's workers are forked from a fork server that imported this
    module, and numba's OpenMP threads started there (compiling a parallel kernel starts
    them) kill each worker forked after it at its first slab ("fork() called from a
    process already using GNU OpenMP")."""
    tomo.back_projection_kernel()(
        np.zeros((2, 4), np.float32), np.zeros(2, np.float32), np.float32(1.5), False
    )


__all__ = [
    "TECHNIQUE",
    "CenterResult",
    "SlabResult",
    "TomographyPlan",
    "find_center_of_rotation",
    "reconstruct_preview",
    "reconstruct_slab",
    "write_preview_nexus",
    "write_volume_nexus",
]


class CenterResult(BaseModel):
    value: float
    confidence: float | None  # None when the user gave the centre
    method: str
    row: int
    output_range: tuple[float, float] | None
    seconds: float


class SlabResult(BaseModel):
    first: int
    stop: int
    part_file: str
    seconds: float


class PreviewResult(BaseModel):
    part_file: str
    rows: list[int]
    centers: list[float]
    binning: int
    seconds: float


def prepared_sinograms(plan: TomographyPlan, first: int, stop: int) -> np.ndarray:
    """Sinograms of rows ``first:stop``, read from the raw files and prepared.

    Rows around the slab are read too when Paganin needs them, then dropped.
    """
    scan = plan.scan
    low, high = plan.read_window(first, stop)
    projections = read_projection_rows(scan, low, high)
    dark = mean_rows(scan.darks, low, high) if scan.darks else None
    if dark is None and scan.dark_level is not None:
        dark = np.full((high - low, scan.columns), scan.dark_level, dtype=np.float32)
    flats = flat_series_rows(scan, low, high) if scan.flats else None
    p = plan.parameters
    sinograms = tomo.prepare_sinograms(
        projections,
        dark,
        flats,
        positions=scan.projection_positions(),
        flat_positions=scan.flat_positions() if scan.flats else None,
        flat_field=p.flat_field,
        paganin=p.paganin,
        energy_kev=p.energy_kev,
        distance_m=p.distance_m,
        pixel_size_um=p.pixel_size_um,
        delta_beta=p.delta_beta,
        minus_log=p.minus_log,
        log_floor=p.log_floor,
        ring_removal=p.ring_removal,
        ring_size=p.ring_size,
    )
    return sinograms[:, first - low : stop - low]


def _reconstruct(
    plan: TomographyPlan, sinograms: np.ndarray, center: float, binning: int = 1
) -> np.ndarray:
    p = plan.parameters
    sinograms, angles, center = tomo.bin_sinograms(sinograms, plan.scan.angles_rad, center, binning)
    slices = tomo.reconstruct(
        sinograms,
        angles,
        center,
        algorithm=p.algorithm,
        filter_name=p.smoothing_window,
        circle_mask=p.circle_mask,
        gpu=plan.gpu,
    )
    return slices / binning if binning > 1 else slices  # per detector pixel, binned or not


@task(name="find_center_of_rotation", cache_policy=NO_CACHE)
@confined_to_proposal("plan.output_dir")
def find_center_of_rotation(plan: TomographyPlan) -> CenterResult:
    """The rotation axis, found on the middle row's sinogram (or the one given).

    For integer outputs without a range, the middle slice is reconstructed
    too and its 0.1-99.9 percentiles become the output range.
    """
    began = time.perf_counter()
    p = plan.parameters
    row = plan.center_row
    needs_range = p.output_range is None and p.output_dtype != "float32"
    if p.center_of_rotation is not None and not needs_range:
        return CenterResult(
            value=p.center_of_rotation,
            confidence=None,
            method="given",
            row=row,
            output_range=p.output_range,
            seconds=time.perf_counter() - began,
        )
    sinogram = prepared_sinograms(plan, row, row + 1)
    if p.center_of_rotation is not None:
        found = tomo.CenterOfRotation(value=p.center_of_rotation, confidence=-1, method="given")
    else:
        try:
            found = tomo.find_center_of_rotation(
                sinogram[:, 0, :], plan.scan.angles_rad, p.cor_search
            )
        except ValueError as exc:
            raise RawDataError(f"{plan.scan.description}, row {row}: {exc}") from None
    output_range = p.output_range
    if needs_range:
        output_range = tomo.auto_range(_reconstruct(plan, sinogram, found.value))
    return CenterResult(
        value=found.value,
        confidence=None if found.method == "given" else found.confidence,
        method=found.method,
        row=row,
        output_range=output_range,
        seconds=time.perf_counter() - began,
    )


@task(name="reconstruct_slab", **CHUNK_TASK)
@worker_paths
@confined_to_proposal()
def reconstruct_slab(
    plan: TomographyPlan, first: int, stop: int, center: CenterResult, work_dir: str
) -> SlabResult:
    """Reconstruct rows ``first:stop`` into a slab file (and TIFF slices when asked)."""
    began = time.perf_counter()
    p = plan.parameters
    slices = _reconstruct(plan, prepared_sinograms(plan, first, stop), center.value)
    slices = tomo.rescale(slices, center.output_range, p.output_dtype)
    part = Path(work_dir) / f"slab_{first:05d}.h5"
    with h5py.File(part, "w") as h5:
        h5.create_dataset("data", data=slices, chunks=(1, *slices.shape[1:]))
    if p.tiff:
        import tifffile

        folder = Path(work_dir) / "tiff"
        folder.mkdir(exist_ok=True)
        stem = Path(plan.output_file).stem
        for offset, image in enumerate(slices):
            tifffile.imwrite(folder / f"{stem}_{first + offset:05d}.tif", image)
    return SlabResult(
        first=first, stop=stop, part_file=str(part), seconds=time.perf_counter() - began
    )


@task(name="reconstruct_preview", cache_policy=NO_CACHE)
@confined_to_proposal()
def reconstruct_preview(plan: TomographyPlan, center: CenterResult, work_dir: str) -> PreviewResult:
    """The centre and quartile slices, and the centre slice at a few axis positions.

    Large detectors are binned (``preview_binning``) so a preview takes seconds.
    """
    began = time.perf_counter()
    rows, binning = plan.preview_rows, plan.preview_binning
    slices = np.concatenate(
        [
            _reconstruct(plan, prepared_sinograms(plan, r, r + 1), center.value, binning)
            for r in rows
        ]
    )
    width = plan.scan.columns
    centers = [
        c
        for c in (center.value + offset for offset in plan.parameters.preview_cor_offsets)
        if 0 <= c < width
    ]
    sinogram = prepared_sinograms(plan, plan.center_row, plan.center_row + 1)
    sweep = np.concatenate([_reconstruct(plan, sinogram, c, binning) for c in centers])
    part = Path(work_dir) / "preview.h5"
    with h5py.File(part, "w") as h5:
        h5["slices"] = slices
        h5["sweep"] = sweep
    return PreviewResult(
        part_file=str(part),
        rows=rows,
        centers=centers,
        binning=binning,
        seconds=time.perf_counter() - began,
    )


# -- writing ----------------------------------------------------------------------


def _axis_values(
    plan: TomographyPlan, count: int, offset: float = 0.0, step: int = 1
) -> tuple[np.ndarray, str]:
    """Voxel positions (um when the pixel size is known, else detector pixels)."""
    positions = np.arange(count, dtype=np.float64) * step + offset + (step - 1) / 2
    size = plan.parameters.pixel_size_um
    return (positions * size, "um") if size else (positions, "pixel")


def _value_units(plan: TomographyPlan) -> str:
    p = plan.parameters
    if p.output_dtype != "float32":
        return "arbitrary (rescaled)"
    return "1/cm" if p.pixel_size_um else "1/pixel"


def _value_scale(plan: TomographyPlan) -> float:
    """Factor from 1/pixel to the output units (1/cm when the pixel size is known)."""
    p = plan.parameters
    if p.output_dtype != "float32" or not p.pixel_size_um:
        return 1.0
    return 1.0 / (p.pixel_size_um * 1e-4)


def _entry_name(plan: TomographyPlan) -> str:
    """The projection scan's name (``N.1``) for Bliss input, as the raw file names it."""
    if plan.raw_file is not None:
        if plan.scan.entry:
            return plan.scan.entry
        return (plan.scan.projections[0].source.dataset or "entry").strip("/").split("/")[0]
    return "entry"


def _start_entry(h5: h5py.File, plan: TomographyPlan) -> h5py.Group:
    scan = plan.scan
    name = _entry_name(plan)
    nexus.write_root_attributes(h5, name)
    entry = h5.create_group(name)
    nexus.set_nx_class(entry, "NXentry")
    entry["title"] = f"{TECHNIQUE} of {scan.title or scan.description}"
    for field in ("start_time", "end_time"):
        if getattr(scan, field):
            entry[field] = getattr(scan, field)
    if plan.raw_file is not None:
        nexus.link_raw_groups(entry, Path(plan.raw_file), name, Path(plan.output_dir))
    return entry


def _write_reconstruction_process(
    entry: h5py.Group, plan: TomographyPlan, center: CenterResult, provenance: dict
) -> None:
    import algotom

    process = nexus.write_process(
        entry,
        "reconstruction",
        parameters={
            "parameters": plan.parameters.model_dump(mode="json"),
            "rows": [plan.first_row, plan.stop_row],
            "center_of_rotation": center.value,
            "gpu": plan.gpu,
        },
        provenance={
            **provenance,
            "source": plan.scan.description,
            "algotom": getattr(algotom, "__version__", "unknown"),
        },
    )
    cor = process.create_dataset("center_of_rotation", data=center.value)
    cor.attrs["units"] = "pixel"
    cor.attrs["method"] = center.method
    cor.attrs["row"] = center.row
    if center.confidence is not None:
        process["center_of_rotation_confidence"] = center.confidence
    process["algorithm"] = plan.parameters.algorithm
    process["n_projections"] = plan.scan.n_projections


def _nxdata_axes(
    group: h5py.Group, plan: TomographyPlan, names_counts: list, step: int = 1
) -> None:
    for name, count, offset in names_counts:
        values, units = _axis_values(plan, count, offset, step)
        nexus.write_axis(group, name, values, units)


@task(name="write_volume_nexus", cache_policy=NO_CACHE)
def write_volume_nexus(
    plan: TomographyPlan,
    center: CenterResult,
    slabs: list[SlabResult],
    provenance: dict,
) -> dict:
    """Publish the slab files and the NeXus file that maps them into one volume.

    The folder the slabs were reconstructed in becomes the volume's folder, beside the
    NeXus file; both appear only when every slab is there. The volume is a VDS over the
    slab files (relative paths, so the folder can move), written without reading the
    slices back except the three shown in the quick-look PNG.
    """
    slabs = sorted(slabs, key=lambda s: s.first)
    covered = sum(s.stop - s.first for s in slabs)
    if covered != plan.n_rows or (slabs and slabs[0].first != plan.first_row):
        raise RawDataError(f"{covered} of {plan.n_rows} slices reconstructed")
    [slab_folder] = {Path(s.part_file).parent for s in slabs}  # one reconstruct step's
    output = Path(plan.output_file)
    volume_dir = output.parent / f"{output.stem}_volume"
    png = output.with_suffix(".png")
    width = plan.scan.columns
    with h5py.File(slabs[0].part_file, "r") as first:
        dtype = first["data"].dtype
    layout = h5py.VirtualLayout(shape=(plan.n_rows, width, width), dtype=dtype)
    for slab in slabs:
        rows = slab.stop - slab.first
        source = h5py.VirtualSource(
            f"{volume_dir.name}/{Path(slab.part_file).name}", "data", shape=(rows, width, width)
        )
        start = slab.first - plan.first_row
        layout[start : start + rows] = source
    panels = _quicklook_slices(plan, slabs)
    with nexus.atomic_outputs(png, output) as (png_temp, h5_temp):
        with h5py.File(h5_temp, "w") as h5:
            entry = _start_entry(h5, plan)
            _write_reconstruction_process(entry, plan, center, provenance)
            data = nexus.create_nxdata(entry, "volume", signal="data", axes=["z", "y", "x"])
            volume = data.create_virtual_dataset("data", layout)
            volume.attrs["interpretation"] = "image"
            volume.attrs["units"] = _value_units(plan)
            if _value_scale(plan) != 1.0:
                volume.attrs["scale_to_units"] = _value_scale(plan)
            _nxdata_axes(
                data, plan, [("z", plan.n_rows, plan.first_row), ("y", width, 0), ("x", width, 0)]
            )
            size = plan.parameters.pixel_size_um
            voxel = data.create_dataset("voxel_size", data=size or 1.0)
            voxel.attrs["units"] = "um" if size else "pixel"
            entry.attrs["default"] = "volume"
        title = plan.scan.title or Path(plan.scan.description.partition("::")[0]).name
        plot_slices(png_temp, panels, f"{Path(plan.output_file).stem}: {title}")
        _publish_folder(slab_folder, volume_dir)
    publish_image(png, f"Tomography: slices of {output.name}")
    return {
        "outputs": [f"{output}::/{_entry_name(plan)}/volume/data"],
        "volume_dir": str(volume_dir),
        "png": str(png),
    }


def _quicklook_slices(plan: TomographyPlan, slabs: list[SlabResult]) -> list:
    panels = []
    for row in plan.preview_rows:
        slab = next(s for s in slabs if s.first <= row < s.stop)
        with h5py.File(slab.part_file, "r") as h5:
            panels.append((f"row {row}", h5["data"][row - slab.first]))
    return panels


def _publish_folder(folder: Path, final: Path) -> None:
    """Rename the slab folder onto ``final``, replacing an older result only then: when
    the flow run publishes its results with their record, or now outside a flow run."""
    try:
        move_into_place(folder, final)
    except OSError as exc:
        raise OutputError(f"cannot move the slab files into {final}: {exc}") from None


@task(name="write_preview_nexus", cache_policy=NO_CACHE)
def write_preview_nexus(
    plan: TomographyPlan, center: CenterResult, preview: PreviewResult, provenance: dict
) -> dict:
    """The preview slices and the centre-of-rotation sweep, as NeXus and a PNG."""
    output = Path(plan.output_file)
    png = output.with_suffix(".png")
    with h5py.File(preview.part_file, "r") as part:
        slices, sweep = part["slices"][()], part["sweep"][()]
    width, step = slices.shape[-1], preview.binning
    with nexus.atomic_outputs(png, output) as (png_temp, h5_temp):
        with h5py.File(h5_temp, "w") as h5:
            entry = _start_entry(h5, plan)
            _write_reconstruction_process(entry, plan, center, provenance)
            data = nexus.create_nxdata(entry, "slices", signal="data", axes=["z", "y", "x"])
            data["data"] = slices
            data["data"].attrs["interpretation"] = "image"
            nexus.write_axis(data, "z", np.array(preview.rows), "pixel")
            _nxdata_axes(data, plan, [("y", width, 0), ("x", width, 0)], step)
            data = nexus.create_nxdata(
                entry, "center_of_rotation_sweep", signal="data", axes=["center", "y", "x"]
            )
            data["data"] = sweep
            data["data"].attrs["interpretation"] = "image"
            nexus.write_axis(data, "center", np.array(preview.centers), "pixel")
            _nxdata_axes(data, plan, [("y", width, 0), ("x", width, 0)], step)
            entry.attrs["default"] = "slices"
        panels = [(f"row {row}", image) for row, image in zip(preview.rows, slices, strict=True)]
        panels += [
            (f"axis {c:.2f}" + (" (found)" if c == center.value else ""), image)
            for c, image in zip(preview.centers, sweep, strict=True)
        ]
        plot_slices(
            png_temp,
            panels,
            f"preview: {plan.scan.description}; centre of rotation {center.value:.2f} px"
            + (f" (confidence {center.confidence:.2f})" if center.confidence is not None else ""),
        )
    publish_image(png, f"Tomography preview of {plan.scan.description}")
    return {
        "outputs": [f"{output}::/{_entry_name(plan)}/slices/data"],
        "volume_dir": None,
        "png": str(png),
    }
