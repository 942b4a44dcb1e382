"""The MX flow: per-image spot finding, hit rate and X-ray centring."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

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
from calypso.tasks.nexus import new_work_dir, remove_work_dir
from calypso.techniques.mx import MXParameters


@flow(name="mx", persist_result=False, log_prints=True)
def mx(
    raw: str,
    parameters: MXParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Find the spots of every image (dispersion threshold), rate hits, map grid scans and
    pick the centring position; index rotation scans with xia2 when it is installed."""
    parameters = parameters or MXParameters()
    run = FlowRun(TECHNIQUE)
    plan = plan_mx(raw, parameters, scans, output_dir, run.workers)
    run.planned(plan, plan.n_frames)
    work_dir = new_work_dir(plan.output_dir)
    try:
        chunks = find_all_spots(plan, str(work_dir))
        found = time.perf_counter()
        indexing = run_indexing(plan)
        written = write_mx_nexus(plan, chunks, indexing, {"flow_run_id": run.run_id, "input": raw})
    except Exception as exc:
        run.failed(exc)
        raise
    finally:
        remove_work_dir(work_dir)
    finished = time.perf_counter()
    registration = run.completed(written["outputs"])
    print(indexing.message)
    return {
        "technique": TECHNIQUE,
        "flow_run_id": run.run_id,
        "input": raw,
        "outputs": written["outputs"],
        "png": written["png"],
        "processed_dataset_dir": plan.output_dir,
        "unit": "images",
        "count": plan.n_frames,
        "tasks": len(chunks),
        "chunk_size": plan.chunk_size,
        "report": written["report"],
        "catalogue_id": registration.catalogue_id,
        "warnings": [registration.warning] if registration.warning else [],
        "timings_s": {
            "total": round(finished - run.clock, 3),
            "find_spots": round(found - run.clock, 3),
            "write": round(finished - found, 3),
            "busy_in_tasks": round(sum(c.seconds for c in chunks), 3),
        },
        "per_s": round(plan.n_frames / max(finished - run.clock, 1e-9), 2),
    }


def find_all_spots(plan: MXPlan, work_dir: str) -> list[ChunkSpots]:
    """Submit every chunk of images to the task runner and collect results as they finish."""
    futures = [
        find_spots_chunk.submit(chunk, plan.scans[chunk.scan], plan.parameters, work_dir)
        for chunk in plan.chunks()
    ]
    return collect(futures, plan.n_frames, f"Finding spots on {plan.n_frames} images",
                   lambda c: c.n_frames)  # fmt: skip
