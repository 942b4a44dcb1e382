"""The spectroscopy flow: XAS from counters to normalised spectra, chi(k) and |chi(R)|."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.nexus import new_work_dir, remove_work_dir
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


@flow(name="spectroscopy", persist_result=False, log_prints=True)
def spectroscopy(
    raw: str,
    parameters: SpectroscopyParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Reduce X-ray absorption spectra: mu(E), calibration, merge, normalisation, EXAFS.

    Spectra are reduced in batches in parallel on Dask (vectorised inside a
    batch); repeated scans are merged; results go to PROCESSED_DATA (or
    ``output_dir``) as NeXus, XDI and a PNG, and are registered in the catalogue.
    """
    parameters = parameters or SpectroscopyParameters()
    run = FlowRun(TECHNIQUE)
    plan = plan_spectroscopy(raw, parameters, scans, output_dir, run.workers)
    run.planned(plan, plan.n_spectra)
    work_dir = new_work_dir(plan.output_dir)
    try:
        batches = reduce_all_batches(plan, str(work_dir))
        if plan.merges:
            batches.append(merge_repeated_scans(plan, batches, str(work_dir)))
        reduced = time.perf_counter()
        written = write_spectroscopy_nexus(plan, batches, {"flow_run_id": run.run_id, "input": raw})
    except Exception as exc:
        run.failed(exc)
        raise
    finally:
        remove_work_dir(work_dir)
    finished = time.perf_counter()
    registration = run.completed(written["outputs"])
    return {
        "technique": TECHNIQUE,
        "flow_run_id": run.run_id,
        "input": raw,
        "outputs": written["outputs"],
        "png": written["png"],
        "processed_dataset_dir": plan.output_dir,
        "unit": "spectra",
        "count": plan.n_spectra,
        "tasks": len(batches),
        "merged": plan.merges,
        "calibration": plan.calibration.model_dump() if plan.calibration else None,
        "key_figures": written["key_figures"],
        "catalogue_id": registration.catalogue_id,
        "warnings": [registration.warning] if registration.warning else [],
        "timings_s": {
            "total": round(finished - run.clock, 3),
            "reduce": round(reduced - run.clock, 3),
            "write": round(finished - reduced, 3),
            "busy_in_tasks": round(sum(b.seconds for b in batches), 3),
        },
        "per_s": round(plan.n_spectra / max(finished - run.clock, 1e-9), 2),
    }


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
