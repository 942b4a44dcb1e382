"""The diffraction flow: azimuthal integration of every frame of a scan with pyFAI."""

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
from calypso.tasks.diffraction import (
    TECHNIQUE,
    ChunkResult,
    IntegrationPlan,
    integrate_chunk,
    plan_integration,
    write_integrated_nexus,
)
from calypso.tasks.nexus import new_work_dir, now_iso, remove_work_dir
from calypso.techniques.diffraction import DiffractionParameters


@flow(name="diffraction", persist_result=False, log_prints=True)
def diffraction(
    raw: str,
    parameters: DiffractionParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Integrate the frames of a raw dataset azimuthally and write NeXus results.

    The frames are split into chunks integrated in parallel on Dask; each worker
    keeps one pyFAI integrator per geometry. Results go to PROCESSED_DATA (or
    ``output_dir``) and are registered in the catalogue.
    """
    parameters = parameters or DiffractionParameters()
    settings = load_settings()
    started, clock = now_iso(), time.perf_counter()
    run_id = str(flow_run.get_id() or "")
    plan = plan_integration(
        raw, parameters, scans, output_dir, local_worker_count(settings.executor)
    )
    work_dir = new_work_dir(plan.output_dir)
    try:
        chunks = integrate_all_chunks(plan, str(work_dir))
        integrated = time.perf_counter()
        outputs = write_integrated_nexus(plan, chunks, {"flow_run_id": run_id, "input": raw})
    except Exception as exc:
        register_processed_dataset(
            processed_record(
                TECHNIQUE,
                plan,
                plan.n_frames,
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
            plan.n_frames,
            run_id=run_id,
            started=started,
            clock=clock,
            outputs=outputs,
        )
    )
    return {
        "technique": TECHNIQUE,
        "flow_run_id": run_id,
        "input": raw,
        "outputs": outputs,
        "processed_dataset_dir": plan.output_dir,
        "frames": plan.n_frames,
        "chunks": len(chunks),
        "unit": "frames",
        "count": plan.n_frames,
        "tasks": len(chunks),
        "chunk_size": plan.chunk_size,
        "catalogue_id": registration.catalogue_id,
        "warnings": [registration.warning] if registration.warning else [],
        "timings_s": {
            "total": round(finished - clock, 3),
            "integrate": round(integrated - clock, 3),
            "write": round(finished - integrated, 3),
            "busy_in_tasks": round(sum(c.seconds for c in chunks), 3),
        },
        "frames_per_s": round(plan.n_frames / max(finished - clock, 1e-9), 2),
        "per_s": round(plan.n_frames / max(finished - clock, 1e-9), 2),
    }


def integrate_all_chunks(plan: IntegrationPlan, work_dir: str) -> list[ChunkResult]:
    """Submit every chunk to the task runner and collect results as they finish."""
    progress = RunProgress(plan.n_frames, f"Integrating {plan.n_frames} frames")
    futures = [
        integrate_chunk.submit(chunk, plan.parameters, plan.geometry, plan.raw_file, work_dir)
        for chunk in plan.chunks()
    ]
    results = []
    for future in as_completed(futures):
        result = future.result()
        results.append(result)
        progress.advance(result.stop - result.start)
    return results
