"""Tasks of the spectroscopy flow: reduce batches of spectra, merge repeats, write NeXus.

A batch travels as (source, first spectrum, last spectrum); each task reads its
own counters, reduces them with the technique functions (vectorised over the
batch) and writes the arrays to a small part file. The writer assembles the
part files into the NeXus result without holding more than one batch.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import RawDataError
from calypso.executors.paths import worker_paths
from calypso.tasks.caching import CHUNK_TASK
from calypso.tasks.plans.spectroscopy import (
    TECHNIQUE,
    SpectraBatch,
    SpectroscopyPlan,
    reduction_keywords,
)
from calypso.tasks.raw.spectra import ColumnTable, SpectrumSource, absorption, read_source
from calypso.tasks.writers import nexus, plots
from calypso.techniques import spectroscopy as xas

__all__ = [
    "TECHNIQUE",
    "BatchResult",
    "SpectroscopyPlan",
    "merge_repeated_scans",
    "reduce_into_part",
    "reduce_spectra_batch",
    "write_spectroscopy_nexus",
]

MERGED = "merged"
#: Arrays of a part file and the NeXus group (or auxiliary signal) they go to.
PART_TO_NEXUS = {
    "mu": "mu",
    "norm": "normalized",
    "flat": "flattened",
    "pre_edge": "pre_edge",
    "post_edge": "post_edge",
    "background": "background",
}


class BatchResult(BaseModel):
    label: str
    start: int
    stop: int
    part_file: str
    seconds: float


def _write_part(path: Path, reduction: xas.Reduction, measured: np.ndarray, stacked: bool) -> None:
    """Store a reduced batch.

    A single spectrum keeps its calibrated energies. Many spectra (a map) share
    one axis, the measured energies of their source, and each spectrum's
    calibration is its ``energy_shift``: no interpolation, so nothing is smoothed.
    """
    norm = reduction.normalization
    arrays = {
        "mu": reduction.mu,
        "norm": norm.norm,
        "flat": norm.flat,
        "pre_edge": norm.pre_edge,
        "post_edge": norm.post_edge,
    }
    if reduction.exafs is not None:
        arrays["background"] = reduction.exafs.background
    measured = np.broadcast_to(measured, reduction.mu.shape)
    axis = measured[0] if stacked else reduction.energy[0]
    with h5py.File(path, "w") as h5:
        h5["energy"] = axis
        differs = [
            row for row in range(measured.shape[0]) if not np.array_equal(measured[row], axis)
        ]
        for name, values in arrays.items():
            if stacked and differs:  # rows measured on other grids go onto the first's
                values = values.copy()
                for row in differs:
                    values[row] = np.interp(axis, measured[row], values[row])
            h5[name] = values
        h5["e0"] = norm.e0
        h5["edge_step"] = norm.edge_step
        h5["edge_noise"] = norm.edge_noise
        h5["e0_spread"] = norm.e0_spread
        h5["energy_shift"] = reduction.shift
        h5["pre_edge_coefficients"] = norm.pre_coefficients
        h5["post_edge_coefficients"] = norm.post_coefficients
        h5.attrs["ranges"] = json.dumps(norm.ranges.__dict__)
        if reduction.exafs is not None:
            h5["k"] = reduction.exafs.k
            h5["chi"] = reduction.exafs.chi
            h5["r"] = reduction.exafs.r
            h5["chir_magnitude"] = reduction.exafs.chir_magnitude
            h5.attrs["nknots"] = reduction.exafs.nknots


@task(name="reduce_spectra_batch", **CHUNK_TASK)
@worker_paths
def reduce_spectra_batch(
    batch: SpectraBatch,
    parameters: xas.SpectroscopyParameters,
    reference_e0: float | None,
    work_dir: str,
) -> BatchResult:
    """Read spectra ``start:stop`` of one source, reduce them, store the arrays in a part file."""
    began = time.perf_counter()
    source = batch.source
    table = read_source(source, batch.start, batch.stop)
    part = Path(work_dir) / f"{source.label}-{batch.start:09d}.h5"
    return reduce_into_part(
        table, batch, parameters, reference_e0, part, source.n_spectra > 1, began
    )


def reduce_into_part(
    table: ColumnTable,
    batch: SpectraBatch,
    parameters: xas.SpectroscopyParameters,
    reference_e0: float | None,
    part: Path,
    stacked: bool,
    began: float,
) -> BatchResult:
    """Reduce the counters ``table`` of spectra ``batch.start:stop`` into ``part``: a batch's
    work once its counters are read (offline batches, and live ones: docs/live.md)."""
    source = batch.source
    where = source.describe() + (f" spectra {batch.start}-{batch.stop - 1}" if stacked else "")
    data = absorption(table, parameters)
    reduction = xas.reduce_spectra(
        data.energy,
        data.mu,
        mu_reference=data.mu_reference,
        reference_e0=reference_e0,
        **reduction_keywords(parameters),
        where=where,
    )
    _write_part(part, reduction, data.energy, stacked=stacked)
    return BatchResult(
        label=source.label,
        start=batch.start,
        stop=batch.stop,
        part_file=str(part),
        seconds=time.perf_counter() - began,
    )


@task(name="merge_repeated_scans", cache_policy=NO_CACHE)
def merge_repeated_scans(
    plan: SpectroscopyPlan, results: list[BatchResult], work_dir: str
) -> BatchResult:
    """Merge the normalised spectra of repeated scans (weighted by 1/noise²) and reduce it.

    Normalised spectra are merged, not mu(E): repeats whose edge step differs
    (fluorescence from another spot, a changed gain) still merge correctly.
    """
    began = time.perf_counter()
    labels = {source.label for source in plan.repeats}
    energies, spectra, noise = [], [], []
    for result in sorted(results, key=lambda r: r.label):
        if result.label in labels:
            with h5py.File(result.part_file, "r") as part:
                energy, norm = part["energy"][()], part["norm"][0]
                energies.append(energy)
                spectra.append(norm)
                noise.append(xas.spectrum_noise(energy, norm, float(part["e0"][0])))
    merged = xas.merge_spectra(energies, spectra, np.array(noise))
    reduction = xas.reduce_spectra(
        merged.energy,
        merged.values,
        **reduction_keywords(plan.parameters),
        where=f"merge of {len(spectra)} scans",
    )
    part_file = Path(work_dir) / f"{MERGED}.h5"
    _write_part(part_file, reduction, reduction.energy, stacked=False)
    with h5py.File(part_file, "a") as h5:
        h5["mu_errors"] = merged.error[None, :]
        h5["merge_weights"] = merged.weights
        h5.attrs["count"] = merged.count
    return BatchResult(
        label=MERGED,
        start=0,
        stop=1,
        part_file=str(part_file),
        seconds=time.perf_counter() - began,
    )


@task(name="write_spectroscopy_nexus", cache_policy=NO_CACHE)
def write_spectroscopy_nexus(
    plan: SpectroscopyPlan, results: list[BatchResult], provenance: dict
) -> dict:
    """Assemble the part files into the NeXus result, XDI files and a quick-look PNG, atomically.

    Returns the NeXus URLs of the normalised spectra and the figures' summary.
    """
    by_label: dict[str, list[BatchResult]] = {}
    for result in sorted(results, key=lambda r: (r.label, r.start)):
        by_label.setdefault(result.label, []).append(result)
    entries: list[tuple[str, SpectrumSource | None]] = [(s.label, s) for s in plan.sources]
    if MERGED in by_label:
        entries.append((MERGED, None))
    output = Path(plan.output_file)
    stem = output.stem
    single = [label for label, source in entries if source is None or source.n_spectra == 1]
    xdi_files = [output.parent / f"{stem}_{_safe(label)}.xdi" for label in single]
    png = output.parent / f"{stem}.png"
    configuration = {
        "parameters": plan.parameters.model_dump(mode="json"),
        "calibration": plan.calibration.model_dump() if plan.calibration else None,
        "element": plan.element,
        "edge": plan.edge,
    }
    urls, key_figures = [], {}
    curves, chi_curves = [], []
    default_entry = MERGED if MERGED in by_label else entries[0][0]
    with nexus.atomic_outputs(*xdi_files, png, output) as temporaries:
        *xdi_temps, png_temp, h5_temp = temporaries
        xdi_for = dict(zip(single, xdi_temps, strict=True))
        with h5py.File(h5_temp, "w") as h5:
            nexus.write_root_attributes(h5, default_entry)
            for label, source in entries:
                parts = by_label.get(label, [])
                expected = source.n_spectra if source is not None else 1
                if sum(p.stop - p.start for p in parts) != expected:
                    raise RawDataError(f"{label}: not every spectrum was reduced")
                entry = h5.create_group(label)
                nexus.set_nx_class(entry, "NXentry")
                title = source.title if source is not None else ""
                entry["title"] = title or (
                    f"merge of {len(plan.repeats)} scans" if source is None else source.describe()
                )
                if source is not None:
                    for name in ("start_time", "end_time"):
                        if getattr(source, name):
                            entry[name] = getattr(source, name)
                    if source.scan is not None:
                        nexus.link_raw_groups(
                            entry, Path(source.path), f"{source.scan}.1", output.parent
                        )
                entry.attrs["default"] = "xas/normalized"
                process = nexus.write_process(
                    entry,
                    "xas",
                    parameters=configuration,
                    provenance={
                        **provenance,
                        "source": source.describe() if source is not None else "merge",
                        "merged": [s.describe() for s in plan.repeats] if source is None else None,
                    },
                )
                process.attrs["default"] = "normalized"
                summary = _copy_parts(process, parts, expected)
                urls.append(f"{output}::/{label}/xas/normalized")
                key_figures[label] = summary
                first = parts[0].part_file
                with h5py.File(first, "r") as part:
                    curves.append((label, part["energy"][()], part["flat"][0]))
                    if "chi" in part:
                        chi_curves.append((label, part["k"][()], part["chi"][0]))
                if label in xdi_for:
                    _write_xdi(xdi_for[label], first, plan, label)
        plots.plot_spectra(
            png_temp,
            curves[-8:],
            chi_curves[-8:],
            plan.parameters.kweight,
            f"{stem}: {plan.n_spectra} spectra"
            + (f", {plan.element} {plan.edge} edge" if plan.element else ""),
        )
    plots.publish_image(png, f"{stem}: normalised mu(E) and chi(k)")
    return {"outputs": urls, "png": str(png), "key_figures": key_figures}


def _safe(label: str) -> str:
    return label.replace(".", "_")


def _copy_parts(process: h5py.Group, parts: list[BatchResult], n: int) -> dict:
    """Copy part files into NXdata groups: mu, normalized, flattened, chi, chir; the fit values."""
    with h5py.File(parts[0].part_file, "r") as first:
        energy = first["energy"][()]
        ranges = json.loads(first.attrs["ranges"])
        nknots = int(first.attrs.get("nknots", 0))
        has_exafs = "chi" in first
        r = first["r"][()] if has_exafs else None
        n_post = first["post_edge_coefficients"].shape[1]
    k_length = 0
    k = None
    if has_exafs:
        for part in parts:
            with h5py.File(part.part_file, "r") as h5:
                if h5["k"].shape[0] > k_length:
                    k_length, k = h5["k"].shape[0], h5["k"][()]
    stacked = n > 1
    lead = (n,) if stacked else ()
    spectrum_axes = ["spectrum"] if stacked else []
    groups: dict[str, h5py.Dataset] = {}

    def nxdata(name: str, signal: str, axis: str, values: np.ndarray, units: str, shape: tuple):
        group = nexus.create_nxdata(process, name, signal=signal, axes=[*spectrum_axes, axis])
        if stacked:
            group["spectrum"] = np.arange(n)
        nexus.write_axis(group, axis, values, units)
        if stacked and axis == "energy":
            group[axis].attrs["long_name"] = "measured energy (eV); calibrated: + fit/energy_shift"
        dataset = group.create_dataset(signal, shape=(*lead, *shape), dtype=np.float64)
        dataset.attrs["interpretation"] = "spectrum"
        groups[name] = dataset
        return group

    mu_group = nxdata("mu", "mu", "energy", energy, "eV", energy.shape)
    mu_group.attrs["auxiliary_signals"] = ["pre_edge", "post_edge"] + (
        ["background"] if has_exafs else []
    )
    for name in ("pre_edge", "post_edge", *(["background"] if has_exafs else [])):
        groups[name] = mu_group.create_dataset(name, shape=(*lead, energy.size), dtype=np.float64)
    nxdata("normalized", "norm", "energy", energy, "eV", energy.shape)
    nxdata("flattened", "flat", "energy", energy, "eV", energy.shape)
    if has_exafs:
        chi_group = nxdata("chi", "chi", "k", k, "1/angstrom", (k_length,))
        chi_group["chi"].attrs["long_name"] = "chi(k) (edge-step units)"
        nxdata("chir", "chir_magnitude", "r", r, "angstrom", r.shape)
    fit = process.create_group("fit")
    nexus.set_nx_class(fit, "NXcollection")
    scalars = {
        "e0": ("eV", lead),
        "edge_step": ("", lead),
        "edge_noise": ("", lead),
        "e0_spread": ("eV", lead),
        "energy_shift": ("eV", lead),
        "pre_edge_coefficients": ("", (*lead, 2)),
        "post_edge_coefficients": ("", (*lead, n_post)),
    }
    fits = {}
    for name, (units, shape) in scalars.items():
        fits[name] = fit.create_dataset(name, shape=shape, dtype=np.float64)
        if units:
            fits[name].attrs["units"] = units
    fit["edge_noise"].attrs["meaning"] = (
        f"edge step / point-to-point noise of mu; below {xas.MIN_EDGE_NOISE_RATIO:g}, E0 and the "
        "edge step are not trusted"
    )
    fit["e0_spread"].attrs["meaning"] = (
        f"E0 found on the even minus on the odd points; over {xas.MAX_E0_SPREAD:g} eV, noise "
        "decides E0"
    )
    fit["pre_edge_coefficients"].attrs["meaning"] = "offset, slope (1/eV) of mu·E^nvict"
    fit["post_edge_coefficients"].attrs["meaning"] = "polynomial in (E - E0) of mu - pre_edge"
    for name, value in ranges.items():
        fit[name] = value
        if name != "nnorm":
            fit[name].attrs["units"] = "eV"
    if has_exafs:
        fit["nknots"] = nknots
    e0_values, steps, noise_ratios, spreads = [], [], [], []
    for part in parts:
        rows = slice(part.start, part.stop) if stacked else Ellipsis
        with h5py.File(part.part_file, "r") as h5:
            for name, key in PART_TO_NEXUS.items():
                if key in groups:
                    groups[key][rows] = h5[name][()] if stacked else h5[name][0]
            if has_exafs:
                chi = np.full((part.stop - part.start, k_length), np.nan)
                chi[:, : h5["chi"].shape[1]] = h5["chi"][()]
                groups["chi"][rows] = chi if stacked else chi[0]
                chir = h5["chir_magnitude"][()]
                groups["chir"][rows] = chir if stacked else chir[0]
            for name in scalars:
                fits[name][rows] = h5[name][()] if stacked else h5[name][0]
            if "mu_errors" in h5:
                mu_errors = process["mu"].create_dataset("mu_errors", data=h5["mu_errors"][0])
                mu_errors.attrs["meaning"] = "weighted standard error of the merged spectra"
                process["fit"]["merge_weights"] = h5["merge_weights"][()]
            e0_values.append(h5["e0"][()])
            steps.append(h5["edge_step"][()])
            noise_ratios.append(h5["edge_noise"][()])
            spreads.append(h5["e0_spread"][()])
    e0_all, step_all = np.concatenate(e0_values), np.concatenate(steps)
    noise_all, spread_all = np.concatenate(noise_ratios), np.concatenate(spreads)
    figures = {
        "spectra": int(n),
        "e0_eV": round(float(np.median(e0_all)), 3),
        "edge_step": float(np.median(step_all)),
        "edge_noise": round(float(np.median(noise_all)), 1),
        "e0_spread_eV": round(float(np.median(spread_all)), 2),
    }
    unsure = (noise_all < xas.MIN_EDGE_NOISE_RATIO) | (spread_all > xas.MAX_E0_SPREAD)
    if np.any(unsure):
        figures["warning"] = (
            f"{int(np.count_nonzero(unsure))} of {n} spectra are too noisy to decide E0: an edge "
            f"step under {xas.MIN_EDGE_NOISE_RATIO:g} times the noise (fit/edge_noise) or E0 "
            f"moving over {xas.MAX_E0_SPREAD:g} eV between the even and odd points "
            "(fit/e0_spread); merge repeats, choose other channels or give e0"
        )
        _warn(figures["warning"])
    return figures


def _warn(message: str) -> None:
    """Log ``message`` as a warning of the running flow (or of Python, outside a flow)."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # outside a flow or task run
        logging.getLogger(__name__).warning(message)


def _write_xdi(path: Path, part_file: str, plan: SpectroscopyPlan, label: str) -> None:
    """An XDI 1.0 file Athena and Larch read: energy, mu, normalised and flattened mu."""
    with h5py.File(part_file, "r") as part:
        energy, mu = part["energy"][()], part["mu"][0]
        norm, flat = part["norm"][0], part["flat"][0]
        e0, step = float(part["e0"][0]), float(part["edge_step"][0])
        shift = float(part["energy_shift"][0])
        ranges = json.loads(part.attrs["ranges"])
    header = ["XDI/1.0 Calypso/" + nexus.software_versions()["calypso"]]
    for index, (name, units) in enumerate(
        [("energy", "eV"), ("mu", ""), ("norm", ""), ("flat", "")], start=1
    ):
        header.append(f"Column.{index}: {name} {units}".rstrip())
    if plan.element:
        header += [f"Element.symbol: {plan.element}", f"Element.edge: {plan.edge or 'K'}"]
    header += [
        f"Calypso.label: {label}",
        f"Calypso.e0: {e0:.3f}",
        f"Calypso.edge_step: {step:.6g}",
        f"Calypso.energy_shift: {shift:.3f}",
        *(f"Calypso.{name}: {value:g}" for name, value in ranges.items()),
        "///",
        f"Reduced by Calypso from {plan.input}",
        "----",
        "energy mu norm flat",
    ]
    np.savetxt(
        path,
        np.column_stack([energy, mu, norm, flat]),
        header="\n".join(header),
        comments="# ",
        fmt="%.6f",
    )
