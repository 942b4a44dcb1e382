"""Live XAS maps (docs/live.md): the spectra of a map scan reduced while it is written.

The flow reads a live chunk's spectra (:mod:`calypso.tasks.raw.live_rows`: from the
growing dataset file or from Bliss's data streams) and its task reduces them with the
offline batch's code (:func:`calypso.tasks.spectroscopy.reduce_into_part`). The partial
file has the result's layout, spectra not done yet NaN.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from calypso.executors.paths import worker_paths
from calypso.registry.access.landlock import confined_to_proposal
from calypso.settings import CalypsoSettings
from calypso.tasks.live_common import partial_file
from calypso.tasks.plans.spectroscopy import SpectraBatch, SpectroscopyPlan
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.spectra import ColumnTable, SpectrumSource
from calypso.tasks.spectroscopy import BatchResult, reduce_into_part
from calypso.tasks.writers import nexus
from calypso.techniques.spectroscopy import SpectroscopyParameters

PROCESS = "xas"  # the result's NXprocess, whose status a partial result sets


# Not cached: a live chunk's rows come from a file still being written (or a stream), and a
# retried live run follows the scan again from its start.
@task(name="reduce_live_spectra", cache_policy=NO_CACHE)
@worker_paths
@confined_to_proposal()
def reduce_live_spectra(
    batch: SpectraBatch,
    table: ColumnTable,
    parameters: SpectroscopyParameters,
    reference_e0: float | None,
    work_dir: str,
) -> BatchResult:
    """Spectra ``batch.start:stop`` of a map in progress (their counters ``table``, read by
    the flow from the file or the streams) reduced into their part file."""
    began = time.perf_counter()
    source = batch.source
    part = Path(work_dir) / f"live-{source.label}-{batch.start:09d}.h5"
    return reduce_into_part(table, batch, parameters, reference_e0, part, True, began)


@task(name="warm_up_spectra_reduction", cache_policy=NO_CACHE)
def warm_up_spectra_reduction(parameters: SpectroscopyParameters) -> float:
    """Normalise (and extract the EXAFS of) a model Fe K edge on this worker while the scan
    has not begun: the worker's first task and the reduction's imports cost seconds, which
    the first chunk would wait for otherwise; seconds spent."""
    from calypso.tasks.plans.spectroscopy import reduction_keywords
    from calypso.techniques import spectroscopy as xas

    began = time.perf_counter()
    energy = np.linspace(6980.0, 7900.0, 600)
    mu = 0.2 + 1.0 / (1.0 + np.exp(-(energy - 7112.0) / 1.5))
    keywords = {**reduction_keywords(parameters), "e0": None}
    with contextlib.suppress(Exception):  # only a warm-up: the first chunk says what is wrong
        xas.reduce_spectra(energy, mu[None, :], **keywords, where="warm-up")
    return time.perf_counter() - began


def write_partial(
    path: Path, entry_name: str, chunks: list[BatchResult], total: int, state: str
) -> None:
    """What is known so far, in the layout of the result: ``N.1/xas/normalized/norm``
    (spectrum x energy) and ``N.1/xas/fit/{e0,edge_step,energy_shift}``, the map so far
    ``N.1/xas/map`` (edge step by spectrum), spectra not done yet NaN; marked partial
    (root ``status``; ``N.1/xas/status``: ``state``, ``spectra_done``). Written aside and
    renamed (:func:`~calypso.tasks.live_common.partial_file`)."""
    if not chunks:
        return
    total = max([total, *(c.stop for c in chunks)])
    with h5py.File(chunks[0].part_file, "r") as part:
        energy = part["energy"][()]
    norm = np.full((total, energy.size), np.nan)
    fits = {name: np.full(total, np.nan) for name in ("e0", "edge_step", "energy_shift")}
    for chunk in chunks:
        with h5py.File(chunk.part_file, "r") as part:
            if "norm" not in part:  # a chunk none of whose spectra could be reduced: NaN
                continue
            norm[chunk.start : chunk.stop] = part["norm"][()]
            for name, values in fits.items():
                values[chunk.start : chunk.stop] = part[name][()]
    done = sum(chunk.stop - chunk.start for chunk in chunks)  # those left out included
    with partial_file(path, entry_name) as h5:
        process = _partial_process(h5, entry_name, "map", state)
        process["spectra_done"] = done
        normalized = nexus.create_nxdata(
            process, "normalized", signal="norm", axes=["spectrum", "energy"]
        )
        normalized["spectrum"] = np.arange(total)
        nexus.write_axis(normalized, "energy", energy, "eV")
        normalized["norm"] = norm
        fit = process.create_group("fit")
        nexus.set_nx_class(fit, "NXcollection")
        for name, values in fits.items():
            fit[name] = values
        edge_map = nexus.create_nxdata(process, "map", signal="edge_step", axes=["spectrum"])
        edge_map["spectrum"] = np.arange(total)
        edge_map["edge_step"] = fits["edge_step"]
        edge_map["e0"] = fits["e0"]
        edge_map.attrs["auxiliary_signals"] = ["e0"]


def write_energy_points_partial(
    path: Path, entry_name: str, table: ColumnTable, parameters: SpectroscopyParameters, state: str
) -> int:
    """What is known of a map scanned an energy at a time before its end, when none of its
    spectra is whole: the mean absorption of its spectra (``table``: all of them, or an even
    sample of a large map) over the energy points scanned so far,
    ``N.1/xas/scanned/mu_mean`` (the default NXdata; ``mu_std`` their spread) against the
    measured ``energy``; marked partial (root ``status``; ``N.1/xas/status``: ``state``,
    ``energy_points_done``, ``spectra_in_mean``). Written aside and renamed. The energy
    points scanned."""
    data = absorption(table, parameters)
    energy = np.atleast_2d(data.energy)[0]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an energy of no finite mu: NaN
        finite = np.where(np.isfinite(data.mu), data.mu, np.nan)
        mean, spread = np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)
    with partial_file(path, entry_name) as h5:
        process = _partial_process(h5, entry_name, "scanned", state)
        process["energy_points_done"] = energy.size
        process["spectra_in_mean"] = data.mu.shape[0]
        scanned = nexus.create_nxdata(process, "scanned", signal="mu_mean", axes=["energy"])
        nexus.write_axis(scanned, "energy", energy, "eV")
        scanned["mu_mean"] = mean
        scanned["mu_std"] = spread
        scanned.attrs["auxiliary_signals"] = ["mu_std"]
    return energy.size


def _partial_process(h5: h5py.File, entry_name: str, default: str, state: str) -> h5py.Group:
    """A partial file's entry and its ``xas`` process, saying ``state``; its NXdata
    ``default`` is what a viewer (and the live quick look) shows."""
    entry = h5.create_group(entry_name)
    nexus.set_nx_class(entry, "NXentry")
    entry.attrs["default"] = f"{PROCESS}/{default}"
    process = entry.create_group(PROCESS)
    nexus.set_nx_class(process, "NXprocess")
    process["status"] = state
    return process


def mark_partial_result(output: Path, entry_name: str, reason: str) -> None:
    """Mark the result written from the spectra that came (``output``) as partial: root
    ``status``, ``N.1/xas/status`` "partial: ``reason``"."""
    with h5py.File(output, "a") as h5:
        h5.attrs["status"] = "partial"
        h5[entry_name][PROCESS]["status"] = f"partial: {reason}"


# -- the plan -----------------------------------------------------------------------------


class LiveSpectroscopyPlan(SpectroscopyPlan):
    """A spectroscopy plan the live flow follows a map with: spectra are its frames, a live
    chunk ``chunk_size`` spectra (``batch_size`` when it is set: the result's batches). A
    map scanned an energy at a time (``whole_at_end``: every spectrum comes at its end) is
    chunked as the offline run batches it, so that each chunk is a batch of the result."""

    whole_at_end: bool = False

    @property
    def n_frames(self) -> int:
        return self.n_spectra

    @property
    def chunk_size(self) -> int:
        if self.whole_at_end:
            return self.batch_size
        return self.parameters.batch_size or LIVE_SPECTRA


LIVE_SPECTRA = 20  # spectra a live chunk: ~15 ms of work, a second of a 20 spectra/s map


def make_live_spectroscopy_plan(
    input_path: str,
    parameters: SpectroscopyParameters,
    first: Any,
    table: ColumnTable,
    output_dir: str | None,
    settings: CalypsoSettings,
    *,
    whole_at_end: bool = False,
    workers: int = 1,
) -> LiveSpectroscopyPlan:
    """The plan of a map in progress (``first``: what its first spectra and its dataset
    file say, :class:`calypso.flows.online.live_base.FirstFrames`; ``table``: the counters
    of its first spectrum, from the file or the streams), made as the offline
    planner makes it: its first spectrum read, normalised and checked, the edge and the
    reference foil's calibration decided, the same output folder, file and checks."""
    from calypso.tasks.plans.live import _live_output
    from calypso.tasks.plans.spectroscopy import (
        TECHNIQUE,
        as_checked,
        check_first_spectrum,
        default_batch_size,
        edge_and_calibration,
    )

    raw_file, number = Path(first.raw_file), first.number
    data = absorption(table, parameters)
    # An energy point a row: npoints counts the energies, and every spectrum has come.
    n_spectra = first.frames if whole_at_end else max(first.npoints or first.frames, 1)
    source = SpectrumSource(
        path=str(raw_file), scan=number, n_spectra=n_spectra, n_points=data.energy.shape[-1],
        energy_rows=whole_at_end, title=first.title, start_time=first.start_time,
    )  # fmt: skip
    where = source.describe()
    checked = check_first_spectrum(table, where, parameters, single=n_spectra == 1)
    parameters = as_checked(parameters, checked)
    element, edge, calibration, notes = edge_and_calibration(parameters, checked, where)
    raw, out = _live_output(
        input_path, raw_file, number, TECHNIQUE, output_dir, settings,
        2 * 16 * 8 * source.n_points * source.n_spectra,
    )  # fmt: skip
    return LiveSpectroscopyPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file),
        sources=[source],
        parameters=parameters,
        calibration=calibration,
        element=element,
        edge=edge,
        output_dir=str(out),
        output_file=str(out / f"{raw_file.stem}.h5"),
        batch_size=parameters.batch_size
        or (default_batch_size(n_spectra, workers) if whole_at_end else LIVE_SPECTRA),
        whole_at_end=whole_at_end,
        notes=notes,
    )
