"""The tomography flow: from raw projections to a reconstructed volume."""

from __future__ import annotations

from typing import Any

from prefect import flow

from calypso.executors.dask import flow_task_runner
from calypso.flows.progress import collect
from calypso.tasks.catalogue import FlowRun
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


@flow(
    name="tomography",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("tomography"),
)
def tomography(
    raw: str,
    parameters: TomographyParameters | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Reconstruct a tomography scan: flat field, -log, ring removal, centre of rotation,
    (Paganin,) filtered back-projection.

    Slabs of slices are reconstructed in parallel on Dask, each read straight
    from the raw files and written to its own file; the NeXus result maps them
    into one volume. ``mode=preview`` reconstructs three slices and a
    centre-of-rotation sweep instead.
    """
    parameters = parameters or TomographyParameters()
    run = FlowRun(TECHNIQUE, raw=raw, export_to=export_to, trigger=trigger)
    plan = plan_tomography(raw, parameters, scans, output_dir, run.workers)
    if not run.planned(plan, plan.n_slices):  # this acquisition was processed already
        return run.skipped()
    provenance = {"flow_run_id": run.run_id, "input": raw}
    slabs: list[SlabResult] = []
    with run.working() as work_dir:
        center = find_center_of_rotation.submit(plan).result()
        print(
            f"centre of rotation {center.value:.2f} px ({center.method}"
            + (f", confidence {center.confidence:.2f}" if center.confidence is not None else "")
            + f") on row {center.row}"
        )
        if plan.preview:
            preview = reconstruct_preview.submit(plan, center, work_dir).result()
            reconstructed = run.elapsed()
            written = write_preview_nexus(plan, center, preview, provenance)
            busy = preview.seconds
        else:
            slabs = reconstruct_all_slabs(plan, center, work_dir)
            reconstructed = run.elapsed()
            written = write_volume_nexus(plan, center, slabs, work_dir, provenance)
            busy = sum(s.seconds for s in slabs)
    write = run.elapsed() - reconstructed
    registration = run.completed(written["outputs"])
    return run.summary(
        raw,
        written["outputs"],
        registration,
        unit="slices",
        tasks=len(slabs) if slabs else 1,
        timings={
            "center_of_rotation": center.seconds,
            "reconstruct": reconstructed,
            "write": write,
            "busy_in_tasks": busy,
        },
        mode=parameters.mode,
        volume_dir=written["volume_dir"],
        png=written["png"],
        chunk_rows=plan.chunk_rows,
        center_of_rotation=center.value,
        center_of_rotation_confidence=center.confidence,
        center_of_rotation_method=center.method,
        gpu=plan.gpu,
    )


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
