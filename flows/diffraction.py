"""The diffraction flow: azimuthal integration of every frame of a scan with pyFAI."""

from __future__ import annotations

from typing import Any

from prefect import flow

from calypso.executors.dask import flow_task_runner
from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.diffraction import (
    TECHNIQUE,
    ChunkResult,
    IntegrationPlan,
    integrate_chunk,
    plan_integration,
    quick_look_path,
    write_integrated_nexus,
)
from calypso.techniques.diffraction import DiffractionParameters


@flow(
    name="diffraction",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("diffraction"),
)
def diffraction(
    raw: str,
    parameters: DiffractionParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Integrate the frames of a raw dataset azimuthally and write NeXus results.

    The frames are split into chunks integrated in parallel on Dask; each worker
    keeps one pyFAI integrator per geometry. Results go to PROCESSED_DATA (or
    ``output_dir``) and are registered in the catalogue.
    """
    parameters = parameters or DiffractionParameters()
    run = FlowRun(TECHNIQUE, raw=raw, export_to=export_to, trigger=trigger)
    plan = plan_integration(raw, parameters, scans, output_dir, run.workers)
    if not run.planned(plan, plan.n_frames):  # this acquisition was processed already
        return run.skipped()
    with run.working() as work_dir:
        chunks = integrate_all_chunks(plan, work_dir)
        integrated = run.elapsed()
        outputs = write_integrated_nexus(plan, chunks, {"flow_run_id": run.run_id, "input": raw})
    write = run.elapsed() - integrated
    registration = run.completed(outputs)
    summary = run.summary(
        raw,
        outputs,
        registration,
        unit="frames",
        tasks=len(chunks),
        timings={
            "integrate": integrated,
            "write": write,
            "busy_in_tasks": sum(c.seconds for c in chunks),
        },
        frames=plan.n_frames,
        png=str(quick_look_path(plan)) if quick_look_path(plan).exists() else None,
        chunks=len(chunks),
        chunk_size=plan.chunk_size,
        workers=sorted({c.worker for c in chunks}),
    )
    return summary | {"frames_per_s": summary["per_s"]}


def integrate_all_chunks(plan: IntegrationPlan, work_dir: str) -> list[ChunkResult]:
    """Submit every chunk to the task runner and collect results as they finish."""
    futures = [
        integrate_chunk.submit(chunk, plan.parameters, plan.geometry, plan.raw_file, work_dir)
        for chunk in plan.chunks()
    ]
    return collect(
        futures, plan.n_frames, f"Integrating {plan.n_frames} frames", lambda r: r.stop - r.start
    )
