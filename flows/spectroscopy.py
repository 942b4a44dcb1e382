"""The spectroscopy flow: XAS from counters to normalised spectra, chi(k) and |chi(R)|."""

from __future__ import annotations

from typing import Any

from prefect import flow

from calypso.executors.dask import flow_task_runner
from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.spectroscopy import (
    TECHNIQUE,
    BatchResult,
    SpectroscopyPlan,
    merge_repeated_scans,
    plan_spectroscopy,
    reduce_spectra_batch,
    write_spectroscopy_nexus,
)
from calypso.techniques.spectroscopy import SpectroscopyParameters


@flow(
    name="spectroscopy",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("spectroscopy"),
)
def spectroscopy(
    raw: str,
    parameters: SpectroscopyParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Reduce X-ray absorption spectra: mu(E), calibration, merge, normalisation, EXAFS.

    Spectra are reduced in batches in parallel on Dask (vectorised inside a
    batch); repeated scans are merged; results go to PROCESSED_DATA (or
    ``output_dir``) as NeXus, XDI and a PNG, and are registered in the catalogue.
    """
    parameters = parameters or SpectroscopyParameters()
    run = FlowRun(TECHNIQUE, raw=raw, export_to=export_to, trigger=trigger)
    plan = plan_spectroscopy(raw, parameters, scans, output_dir, run.workers)
    if not run.planned(plan, plan.n_spectra):  # this acquisition was processed already
        return run.skipped()
    with run.working() as work_dir:
        batches = reduce_all_batches(plan, work_dir)
        if plan.merges:
            batches.append(merge_repeated_scans(plan, batches, work_dir))
        reduced = run.elapsed()
        written = write_spectroscopy_nexus(plan, batches, {"flow_run_id": run.run_id, "input": raw})
    write = run.elapsed() - reduced
    registration = run.completed(written["outputs"])
    return run.summary(
        raw,
        written["outputs"],
        registration,
        unit="spectra",
        tasks=len(batches),
        timings={
            "reduce": reduced,
            "write": write,
            "busy_in_tasks": sum(b.seconds for b in batches),
        },
        png=written["png"],
        merged=plan.merges,
        calibration=plan.calibration.model_dump() if plan.calibration else None,
        key_figures=written["key_figures"],
    )


def reduce_all_batches(plan: SpectroscopyPlan, work_dir: str) -> list[BatchResult]:
    """Submit every batch to the task runner and collect results as they finish."""
    reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
    futures = [
        reduce_spectra_batch.submit(batch, plan.parameters, reference_e0, work_dir)
        for batch in plan.batches()
    ]
    return collect(
        futures, plan.n_spectra, f"Reducing {plan.n_spectra} spectra", lambda r: r.stop - r.start
    )
