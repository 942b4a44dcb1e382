"""Tomography: from raw projections to a reconstructed volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calypso.flows.techniques import OUTPUTS, Option, Step, Technique, planning_step


def center_of_rotation(ctx: Any, plan: Any) -> Any:
    """The centre of rotation: searched (on a Dask worker), or the value given."""
    from calypso.tasks.tomography import find_center_of_rotation

    center = find_center_of_rotation.submit(plan).result()
    print(
        f"centre of rotation {center.value:.2f} px ({center.method}"
        + (f", confidence {center.confidence:.2f}" if center.confidence is not None else "")
        + f") on row {center.row}"
    )
    ctx.report(
        mode=plan.parameters.mode,
        chunk_rows=plan.chunk_rows,
        center_of_rotation=center.value,
        center_of_rotation_confidence=center.confidence,
        center_of_rotation_method=center.method,
        gpu=plan.gpu,
    )
    return center


def reconstruct(ctx: Any, plan: Any, center: Any) -> Any:
    """Slabs of slices reconstructed in parallel, each read straight from the raw files
    into its own file; or, for ``mode=preview``, three slices and an axis sweep."""
    from calypso.tasks.progress import collect
    from calypso.tasks.tomography import reconstruct_preview, reconstruct_slab

    if plan.preview:
        preview = reconstruct_preview.submit(plan, center, ctx.work_dir).result()
        ctx.report(tasks=1, busy=preview.seconds)
        return preview
    futures = [
        reconstruct_slab.submit(plan, first, stop, center, ctx.work_dir)
        for first, stop in plan.slabs()
    ]
    slabs = collect(
        futures, plan.n_rows, f"Reconstructing {plan.n_rows} slices", lambda r: r.stop - r.first
    )
    ctx.report(tasks=len(slabs), busy=sum(s.seconds for s in slabs))
    return slabs


def write(ctx: Any, plan: Any, center: Any, slices: Any) -> list[str]:
    from calypso.tasks.tomography import write_preview_nexus, write_volume_nexus

    if plan.preview:
        written = write_preview_nexus(plan, center, slices, ctx.provenance)
    else:
        written = write_volume_nexus(plan, center, slices, ctx.provenance)
    ctx.report(volume_dir=written["volume_dir"], png=written["png"])
    return written["outputs"]


def write_sample(
    directory: Path, seed: int = 0, size: tuple[int, int, int] = (32, 192, 360)
) -> str:
    """A scan of a 3D phantom (darks, flats before and after, projections, the axis off
    centre, defective pixels); what to run next."""
    from calypso.errors import ParameterError
    from calypso.flows.samples.tomography import write_tomography_sample

    rows, columns, projections = size
    if rows < 1 or columns < 32 or projections < 10:
        raise ParameterError("--size: at least 1 row, 32 columns and 10 projections")
    sample = write_tomography_sample(
        directory, rows=rows, columns=columns, projections=projections, seed=seed
    )
    return (
        f"raw dataset: {sample.raw_dataset_dir}\n"
        f"ground truth: {sample.ground_truth} (true centre of rotation "
        f"{sample.geometry.center_of_rotation:.2f} px)\n"
        f"reduce it with:\n  calypso run tomography {sample.raw_dataset_dir}\n"
        f"or look first:\n  calypso run tomography {sample.raw_dataset_dir} --set mode=preview"
    )


TOMOGRAPHY = Technique(
    name="tomography",
    description="Reconstruct a tomography scan: flat field, -log, ring removal, centre of "
    "rotation, (Paganin,) filtered back-projection; slabs in parallel on Dask. "
    "mode=preview reconstructs three slices and a centre-of-rotation sweep instead.",
    unit="slices",
    parameters_at="calypso.techniques.tomography:TomographyParameters",
    plan_at="calypso.tasks.plans.tomography:make_tomography_plan",
    count_attribute="n_slices",
    steps=(
        planning_step("tomography"),
        Step(
            "tomography.center_of_rotation",
            {"plan": "tomography.plan"},
            "tomography.center",
            f"{__name__}:center_of_rotation",
            "centre of rotation (search, or the given value)",
        ),
        Step(
            "tomography.reconstruct",
            {"plan": "tomography.plan", "center": "tomography.center"},
            "tomography.slices",
            f"{__name__}:reconstruct",
            "flat field, rings, Paganin, back-projection of slabs in parallel (or a preview)",
        ),
        Step(
            "tomography.write",
            {
                "plan": "tomography.plan",
                "center": "tomography.center",
                "slices": "tomography.slices",
            },
            OUTPUTS,
            f"{__name__}:write",
            "the NeXus volume (or preview) and the quick-look plot",
        ),
    ),
    specification=Path(__file__).with_name("tomography.yaml"),
    flow_at="calypso.flows.tomography:tomography",
    preload="calypso.tasks.tomography",
    sample_at=f"{__name__}:write_sample",
    sample_options=(
        Option(
            ("--size",),
            {
                "type": int,
                "nargs": 3,
                "metavar": ("ROWS", "COLUMNS", "PROJECTIONS"),
                "default": (32, 192, 360),
                "help": "detector rows and columns, and projections over 180 degrees",
            },
        ),
    ),
    concurrency=1,
)
