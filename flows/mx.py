"""The MX flow: per-image spot finding, hit rate and X-ray centring."""

from __future__ import annotations

from typing import Any

from prefect import flow

from calypso.executors.dask import flow_task_runner
from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.mx import (
    TECHNIQUE,
    ChunkSpots,
    MXPlan,
    find_spots_chunk,
    plan_mx,
    run_indexing,
    write_mx_nexus,
)
from calypso.techniques.mx import MXParameters


@flow(
    name="mx",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("mx"),
)
def mx(
    raw: str,
    parameters: MXParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Find the spots of every image (dispersion threshold), rate hits, map grid scans and
    pick the centring position; index rotation scans with xia2 when it is installed."""
    parameters = parameters or MXParameters()
    run = FlowRun(TECHNIQUE, raw=raw, export_to=export_to, trigger=trigger)
    plan = plan_mx(raw, parameters, scans, output_dir, run.workers)
    if not run.planned(plan, plan.n_frames):  # this acquisition was processed already
        return run.skipped()
    with run.working() as work_dir:
        chunks = find_all_spots(plan, work_dir)
        found = run.elapsed()
        indexing = run_indexing(plan)
        written = write_mx_nexus(plan, chunks, indexing, {"flow_run_id": run.run_id, "input": raw})
    write = run.elapsed() - found
    registration = run.completed(written["outputs"])
    print(indexing.message)
    return run.summary(
        raw,
        written["outputs"],
        registration,
        unit="images",
        tasks=len(chunks),
        timings={
            "find_spots": found,
            "index_and_write": write,
            "busy_in_tasks": sum(c.seconds for c in chunks),
        },
        png=written["png"],
        chunk_size=plan.chunk_size,
        report=written["report"],
    )


def find_all_spots(plan: MXPlan, work_dir: str) -> list[ChunkSpots]:
    """Submit every chunk of images to the task runner and collect results as they finish."""
    futures = [
        find_spots_chunk.submit(chunk, plan.scans[chunk.scan], plan.parameters, work_dir)
        for chunk in plan.chunks()
    ]
    return collect(futures, plan.n_frames, f"Finding spots on {plan.n_frames} images",
                   lambda c: c.n_frames)  # fmt: skip
