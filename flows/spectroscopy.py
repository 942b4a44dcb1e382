"""The spectroscopy flow: XAS from counters to normalised spectra, chi(k) and |chi(R)|."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.runtime import flow_run

from calypso.executors import local_worker_count
from calypso.flows.progress import RunProgress
from calypso.settings import load_settings
from calypso.tasks.catalogue import processed_record, register_processed_dataset
from calypso.tasks.nexus import new_work_dir, now_iso, remove_work_dir
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
    settings = load_settings()
    started, clock = now_iso(), time.perf_counter()
    run_id = str(flow_run.get_id() or "")
    plan = plan_spectroscopy(
        raw, parameters, scans, output_dir, local_worker_count(settings.executor)
    )
    work_dir = new_work_dir(plan.output_dir)
    try:
        batches = reduce_all_batches(plan, str(work_dir))
        if plan.merges:
            batches.append(merge_repeated_scans(plan, batches, str(work_dir)))
        reduced = time.perf_counter()
        written = write_spectroscopy_nexus(plan, batches, {"flow_run_id": run_id, "input": raw})
    except Exception as exc:
        register_processed_dataset(
            processed_record(
                TECHNIQUE,
                plan,
                plan.n_spectra,
                run_id=run_id,
                started=started,
                clock=clock,
                outputs=[],
                status="failed",
                message=str(exc),
            )
        )
        raise
    finally:
        remove_work_dir(work_dir)
    finished = time.perf_counter()
    registration = register_processed_dataset(
        processed_record(
            TECHNIQUE,
            plan,
            plan.n_spectra,
            run_id=run_id,
            started=started,
            clock=clock,
            outputs=written["outputs"],
        )
    )
    return {
        "technique": TECHNIQUE,
        "flow_run_id": run_id,
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
            "total": round(finished - clock, 3),
            "reduce": round(reduced - clock, 3),
            "write": round(finished - reduced, 3),
            "busy_in_tasks": round(sum(b.seconds for b in batches), 3),
        },
        "per_s": round(plan.n_spectra / max(finished - clock, 1e-9), 2),
    }


def reduce_all_batches(plan: SpectroscopyPlan, work_dir: str) -> list[BatchResult]:
    """Submit every batch to the task runner and collect results as they finish."""
    progress = RunProgress(plan.n_spectra, f"Reducing {plan.n_spectra} spectra")
    reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
    futures = [
        reduce_spectra_batch.submit(batch, plan.parameters, reference_e0, work_dir)
        for batch in plan.batches()
    ]
    results = []
    for future in as_completed(futures):
        result = future.result()
        results.append(result)
        progress.advance(result.stop - result.start)
    return results
