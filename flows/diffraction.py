"""The diffraction flow: azimuthal integration of every frame of a scan with pyFAI."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.diffraction import (
    TECHNIQUE,
    ChunkResult,
    IntegrationPlan,
    integrate_chunk,
    plan_integration,
    write_integrated_nexus,
)
from calypso.tasks.nexus import new_work_dir, remove_work_dir
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
    run = FlowRun(TECHNIQUE)
    plan = plan_integration(raw, parameters, scans, output_dir, run.workers)
    run.planned(plan, plan.n_frames)
    work_dir = new_work_dir(plan.output_dir)
    try:
        chunks = integrate_all_chunks(plan, str(work_dir))
        integrated = time.perf_counter()
        outputs = write_integrated_nexus(plan, chunks, {"flow_run_id": run.run_id, "input": raw})
    except Exception as exc:
        run.failed(exc)
        raise
    finally:
        remove_work_dir(work_dir)
    finished = time.perf_counter()
    registration = run.completed(outputs)
    return {
        "technique": TECHNIQUE,
        "flow_run_id": run.run_id,
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
            "total": round(finished - run.clock, 3),
            "integrate": round(integrated - run.clock, 3),
            "write": round(finished - integrated, 3),
            "busy_in_tasks": round(sum(c.seconds for c in chunks), 3),
        },
        "frames_per_s": round(plan.n_frames / max(finished - run.clock, 1e-9), 2),
        "per_s": round(plan.n_frames / max(finished - run.clock, 1e-9), 2),
    }


def integrate_all_chunks(plan: IntegrationPlan, work_dir: str) -> list[ChunkResult]:
    """Submit every chunk to the task runner and collect results as they finish."""
    futures = [
        integrate_chunk.submit(chunk, plan.parameters, plan.geometry, plan.raw_file, work_dir)
        for chunk in plan.chunks()
    ]
    return collect(
        futures, plan.n_frames, f"Integrating {plan.n_frames} frames", lambda r: r.stop - r.start
    )
