"""The tomography flow: from raw projections to a reconstructed volume."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
from calypso.tasks.nexus import new_work_dir, remove_work_dir
from calypso.tasks.tomography import (
    TECHNIQUE,
    CenterResult,
    SlabResult,
    TomographyPlan,
    find_center_of_rotation,
    plan_tomography,
    reconstruct_preview,
    reconstruct_slab,
    write_preview_nexus,
    write_volume_nexus,
)
from calypso.techniques.tomography import TomographyParameters


@flow(name="tomography", persist_result=False, log_prints=True)
def tomography(
    raw: str,
    parameters: TomographyParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Reconstruct a tomography scan: flat field, -log, ring removal, centre of rotation,
    (Paganin,) filtered back-projection.

    Slabs of slices are reconstructed in parallel on Dask, each read straight
    from the raw files and written to its own file; the NeXus result maps them
    into one volume. ``mode=preview`` reconstructs three slices and a
    centre-of-rotation sweep instead.
    """
    parameters = parameters or TomographyParameters()
    run = FlowRun(TECHNIQUE)
    plan = plan_tomography(raw, parameters, scans, output_dir, run.workers)
    run.planned(plan, plan.n_slices)
    provenance = {"flow_run_id": run.run_id, "input": raw}
    work_dir = new_work_dir(plan.output_dir)
    slabs: list[SlabResult] = []
    try:
        center = find_center_of_rotation(plan)
        print(
            f"centre of rotation {center.value:.2f} px ({center.method}"
            + (f", confidence {center.confidence:.2f}" if center.confidence is not None else "")
            + f") on row {center.row}"
        )
        if plan.preview:
            preview = reconstruct_preview(plan, center, str(work_dir))
            reconstructed = time.perf_counter()
            written = write_preview_nexus(plan, center, preview, provenance)
            busy = preview.seconds
        else:
            slabs = reconstruct_all_slabs(plan, center, str(work_dir))
            reconstructed = time.perf_counter()
            written = write_volume_nexus(plan, center, slabs, str(work_dir), provenance)
            busy = sum(s.seconds for s in slabs)
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
        "mode": parameters.mode,
        "outputs": written["outputs"],
        "volume_dir": written["volume_dir"],
        "png": written["png"],
        "processed_dataset_dir": plan.output_dir,
        "unit": "slices",
        "count": plan.n_slices,
        "tasks": len(slabs) if slabs else 1,
        "chunk_rows": plan.chunk_rows,
        "center_of_rotation": center.value,
        "center_of_rotation_confidence": center.confidence,
        "center_of_rotation_method": center.method,
        "gpu": plan.gpu,
        "catalogue_id": registration.catalogue_id,
        "warnings": [registration.warning] if registration.warning else [],
        "timings_s": {
            "total": round(finished - run.clock, 3),
            "center_of_rotation": round(center.seconds, 3),
            "reconstruct": round(reconstructed - run.clock, 3),
            "write": round(finished - reconstructed, 3),
            "busy_in_tasks": round(busy, 3),
        },
        "per_s": round(plan.n_slices / max(finished - run.clock, 1e-9), 2),
    }


def reconstruct_all_slabs(
    plan: TomographyPlan, center: CenterResult, work_dir: str
) -> list[SlabResult]:
    """Submit every slab to the task runner and collect results as they finish."""
    futures = [
        reconstruct_slab.submit(plan, first, stop, center, work_dir) for first, stop in plan.slabs()
    ]
    return collect(
        futures, plan.n_rows, f"Reconstructing {plan.n_rows} slices", lambda r: r.stop - r.first
    )
