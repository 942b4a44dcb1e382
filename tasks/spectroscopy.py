"""Tasks of the spectroscopy flow: reduce batches of spectra, merge repeats, write NeXus.

A batch travels as (source, first spectrum, last spectrum); each task reads its
own counters, reduces them with the technique functions (vectorised over the
batch) and writes the arrays to a small part file. The writer assembles the
part files into the NeXus result as they finish, holding one batch at a time
(:mod:`calypso.tasks.writers.spectra_nexus`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.errors import RawDataError
from calypso.executors.paths import worker_paths
from calypso.registry.access.landlock import confined_to_proposal
from calypso.tasks.caching import CHUNK_TASK
from calypso.tasks.plans.spectroscopy import (
    TECHNIQUE,
    SpectraBatch,
    SpectroscopyPlan,
    reduction_keywords,
)
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.spectra import ColumnTable, SpectrumSource, read_source
from calypso.tasks.writers import nexus, plots
from calypso.tasks.writers.spectra_nexus import SpectraAssembly
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


class BatchResult(BaseModel):
    label: str
    start: int
    stop: int
    part_file: str
    seconds: float


def _write_part(
    path: Path,
    batch: xas.BatchReduction,
    measured: np.ndarray,
    stacked: bool,
    points_left_out: tuple[float, ...] = (),
) -> None:
    """Store a reduced batch, reduced and written a block of spectra at a time.

    A single spectrum keeps its calibrated energies. Many spectra (a map) share
    one axis, the measured energies of their source, and each spectrum's
    calibration is its ``energy_shift``: no interpolation, so nothing is smoothed.
    """
    n, m = batch.mu.shape
    measured = np.broadcast_to(measured, (n, m))
    axis = measured[0]
    # A map's rows measured on another grid than its first (a per-spectrum energy) are
    # interpolated onto it; a single spectrum keeps its own.
    differs = np.flatnonzero((measured != axis).any(axis=1)) if stacked else np.empty(0, int)

    def onto_axis(values: np.ndarray, rows: slice) -> np.ndarray:
        inside = differs[(differs >= rows.start) & (differs < rows.stop)]
        if not inside.size:
            return values
        values = values.copy()
        for row in inside:
            values[row - rows.start] = np.interp(axis, measured[row], values[row - rows.start])
        return values

    with h5py.File(path, "w") as h5:
        for rows, reduction in batch.normalized():
            norm = reduction.normalization
            if rows.start == 0:
                h5["energy"] = axis if stacked else reduction.energy[0]
                for name in ("mu", "norm", "flat", "pre_edge", "post_edge"):
                    h5.create_dataset(name, (n, m), dtype=np.float64)
                for name in ("e0", "edge_step", "edge_noise", "e0_spread", "energy_shift"):
                    h5.create_dataset(name, (n,), dtype=np.float64)
                for name, values in (
                    ("pre_edge_coefficients", norm.pre_coefficients),
                    ("post_edge_coefficients", norm.post_coefficients),
                ):
                    h5.create_dataset(name, (n, values.shape[1]), dtype=np.float64)
                h5.attrs["ranges"] = json.dumps(norm.ranges.__dict__)
            h5["mu"][rows] = onto_axis(reduction.mu, rows)
            h5["norm"][rows] = onto_axis(norm.norm, rows)
            h5["flat"][rows] = onto_axis(norm.flat, rows)
            h5["pre_edge"][rows] = onto_axis(norm.pre_edge, rows)
            h5["post_edge"][rows] = onto_axis(norm.post_edge, rows)
            h5["e0"][rows] = norm.e0
            h5["edge_step"][rows] = norm.edge_step
            h5["edge_noise"][rows] = norm.edge_noise
            h5["e0_spread"][rows] = norm.e0_spread
            h5["energy_shift"][rows] = reduction.shift
            h5["pre_edge_coefficients"][rows] = norm.pre_coefficients
            h5["post_edge_coefficients"][rows] = norm.post_coefficients
        if batch.design is not None:
            for rows, exafs in batch.exafs():
                if rows.start == 0:
                    h5["k"], h5["r"] = exafs.k, exafs.r
                    h5.create_dataset("background", (n, m), dtype=np.float64)
                    h5.create_dataset("chi", (n, exafs.k.size), dtype=np.float64)
                    h5.create_dataset("chir_magnitude", (n, exafs.r.size), dtype=np.float64)
                    h5.attrs["nknots"] = exafs.nknots
                h5["background"][rows] = onto_axis(exafs.background, rows)
                h5["chi"][rows] = exafs.chi
                h5["chir_magnitude"][rows] = exafs.chir_magnitude
        if batch.keep is not None:  # spectra of a map that could not be reduced
            h5["skipped"] = ~batch.keep
            h5.attrs["skip_reasons"] = json.dumps(batch.skip_reasons)
        if points_left_out:  # a single spectrum's dropouts (tasks/raw/absorption.py)
            h5["points_left_out"] = np.array(points_left_out)


def _write_skipped_part(
    path: Path, measured: np.ndarray, mu: np.ndarray, reasons: dict[str, int]
) -> None:
    """A batch of a map left out whole: its measured energy and mu, every spectrum skipped."""
    with h5py.File(path, "w") as h5:
        h5["energy"] = np.atleast_2d(measured)[0]
        h5["mu"] = mu
        h5["skipped"] = np.ones(mu.shape[0], dtype=bool)
        h5.attrs["skip_reasons"] = json.dumps(reasons)


@task(name="reduce_spectra_batch", **CHUNK_TASK)
@worker_paths
@confined_to_proposal()
def reduce_spectra_batch(
    batch: SpectraBatch,
    parameters: xas.SpectroscopyParameters,
    reference_e0: float | None,
    work_dir: str,
) -> BatchResult:
    """Read spectra ``start:stop`` of one source, reduce them, store the arrays in a part file."""
    began = time.perf_counter()
    source = batch.source
    part = Path(work_dir) / f"{source.label}-{batch.start:09d}.h5"
    # The counters are handed over, not kept here: reduce_into_part lets them go once it
    # has mu(E) (~10 kB a spectrum, a third of what a batch holds while it is reduced).
    return reduce_into_part(
        read_source(source, batch.start, batch.stop),
        batch,
        parameters,
        reference_e0,
        part,
        source.n_spectra > 1,
        began,
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
    del table  # the raw counters: freed while the batch is reduced, where the caller let go
    energy, mu, points_left_out = data.energy, data.mu, data.points_left_out
    try:
        reduction = xas.BatchReduction(
            energy,
            mu,
            mu_reference=data.mu_reference,
            reference_e0=reference_e0,
            **reduction_keywords(parameters),
            where=where,
            skip_unusable=stacked,
        )
    except xas.NoSpectrumReducible as nothing:
        # A batch of a map none of whose spectra can be reduced (a raster's lines off the
        # sample): left out, its results NaN; the map's other batches decide.
        _write_skipped_part(part, energy, mu, nothing.reasons)
    else:
        del data  # with it the reference foil's mu(E), needed for the calibration only
        _write_part(part, reduction, energy, stacked, points_left_out)
    return BatchResult(
        label=source.label,
        start=batch.start,
        stop=batch.stop,
        part_file=str(part),
        seconds=time.perf_counter() - began,
    )


@task(name="merge_repeated_scans", cache_policy=NO_CACHE)
@confined_to_proposal()
def merge_repeated_scans(
    plan: SpectroscopyPlan, results: list[BatchResult], work_dir: str
) -> BatchResult:
    """Merge the normalised spectra of repeated scans (weighted by 1/noise²) and reduce it.

    Normalised spectra are merged, not mu(E): repeats whose edge step differs
    (fluorescence from another spot, a changed gain) still merge correctly.
    """
    began = time.perf_counter()
    labels = {source.label for source in plan.repeats}
    energies, spectra, noise, shifts = [], [], [], []
    for result in sorted(results, key=lambda r: r.label):
        if result.label in labels:
            with h5py.File(result.part_file, "r") as part:
                energy, norm = part["energy"][()], part["norm"][0]
                energies.append(energy)
                spectra.append(norm)
                noise.append(xas.spectrum_noise(energy, norm, float(part["e0"][0])))
                shifts.append(float(part["energy_shift"][0]))
    merged = xas.merge_spectra(energies, spectra, np.array(noise))
    reduction = xas.BatchReduction(
        merged.energy,
        merged.values,
        **reduction_keywords(plan.parameters),
        where=f"merge of {len(spectra)} scans",
    )
    part_file = Path(work_dir) / f"{MERGED}.h5"
    _write_part(part_file, reduction, merged.energy, stacked=False)
    with h5py.File(part_file, "a") as h5:
        # Each repeat's energies were calibrated before the merge (a single spectrum keeps
        # its calibrated axis): the merge's shift is theirs, not the 0 of its own reduction
        # (an Athena user read "not calibrated" in the merged XDI).
        h5["energy_shift"][0] = float(np.median(shifts))
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
    plan: SpectroscopyPlan, results: Iterable[BatchResult], provenance: dict
) -> dict:
    """Assemble the part files into the NeXus result, XDI files and a quick-look PNG, atomically.

    ``results`` may still be coming (:class:`calypso.tasks.progress.AsTheyFinish`): each
    batch is copied into the result as it finishes. Returns the NeXus URLs of the
    normalised spectra and the figures' summary.
    """
    entries: list[tuple[str, SpectrumSource | None]] = [(s.label, s) for s in plan.sources]
    if plan.merges:
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
    default_entry = MERGED if plan.merges else entries[0][0]
    title = f"{stem}: {plan.n_spectra} spectra" + (
        f", {plan.element} {plan.edge} edge" if plan.element else ""
    )
    with (
        nexus.atomic_outputs(*xdi_files, png, output) as temporaries,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="quick-look") as drawer,
    ):
        *xdi_temps, png_temp, h5_temp = temporaries
        xdi_for = dict(zip(single, xdi_temps, strict=True))

        def draw(assemblies: dict[str, SpectraAssembly], early: bool) -> Future | None:
            """The quick look (each scan's first spectrum reduced), drawn in a thread, early
            while a map's other batches are copied (~0.13 s off the end of its run); None
            while it cannot be drawn yet."""
            firsts = {label: a.first_reduced_known() for label, a in assemblies.items()}
            if early and (plan.merges or not all(firsts.values())):  # a merge: once made
                return None
            curves, chi_curves = [], []
            for label, first in firsts.items():
                curve, chi = _first_curves((first or assemblies[label].first).part_file)
                curves.append((label, *curve))
                if chi is not None:
                    chi_curves.append((label, *chi))
            return drawer.submit(
                plots.plot_spectra, png_temp, curves[-8:], chi_curves[-8:],
                plan.parameters.kweight, title,
            )  # fmt: skip

        with h5py.File(h5_temp, "w") as h5:
            nexus.write_root_attributes(h5, default_entry)
            assemblies = {
                label: SpectraAssembly(
                    _write_entry(h5, label, source, plan, configuration, provenance, output),
                    source.n_spectra if source is not None else 1,
                )
                for label, source in entries
            }
            drawing = None
            for result in results:  # as each batch finishes
                if result.label not in assemblies:
                    raise RawDataError(f"{result.label}: reduced, but not a scan of this run")
                assemblies[result.label].add(result)
                drawing = drawing or draw(assemblies, early=True)
            for label, assembly in assemblies.items():
                if assembly.count != assembly.n:
                    raise RawDataError(f"{label}: not every spectrum was reduced")
                key_figures[label] = assembly.finish()
                urls.append(f"{output}::/{label}/xas/normalized")
                if label in xdi_for:
                    _write_xdi(xdi_for[label], assembly.first_reduced.part_file, plan, label)
            drawing = drawing or draw(assemblies, early=False)
        drawing.result()
    plots.publish_image(png, f"{stem}: normalised mu(E) and chi(k)")
    return {"outputs": urls, "png": str(png), "key_figures": key_figures}


def _first_curves(part_file: str) -> tuple[tuple, tuple | None]:
    """(energy, flattened mu) and (k, chi) or None of a part file's first reduced spectrum."""
    with h5py.File(part_file, "r") as part:
        row = _first_reduced_row(part)
        chi = (part["k"][()], part["chi"][row]) if "chi" in part else None
        return (part["energy"][()], part["flat"][row]), chi


def _first_reduced_row(part: h5py.File) -> int:
    """The first spectrum of a part file that was reduced (a map's may be left out)."""
    if "skipped" not in part:
        return 0
    return int(np.argmin(part["skipped"][()]))


def _write_entry(
    h5: h5py.File,
    label: str,
    source: SpectrumSource | None,
    plan: SpectroscopyPlan,
    configuration: dict,
    provenance: dict,
    output: Path,
) -> h5py.Group:
    """A scan's NXentry (the merge's, for ``source`` None) and its ``xas`` process group."""
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
            nexus.link_raw_groups(entry, Path(source.path), f"{source.scan}.1", output.parent)
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
    return process


def _safe(label: str) -> str:
    return label.replace(".", "_")


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
