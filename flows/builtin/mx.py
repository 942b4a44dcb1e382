"""MX: per-image spot finding, hit rate and X-ray centring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calypso.flows.techniques import OUTPUTS, Step, Technique, planning_step


def find_spots(ctx: Any, plan: Any) -> list[Any]:
    """Spots of every image, chunks of images in parallel; results as they finish."""
    from calypso.tasks.mx import find_spots_chunk
    from calypso.tasks.progress import collect

    futures = [
        find_spots_chunk.submit(chunk, plan.scans[chunk.scan], plan.parameters, ctx.work_dir)
        for chunk in plan.chunks()
    ]
    chunks = collect(futures, plan.n_frames, f"Finding spots on {plan.n_frames} images",
                     lambda c: c.n_frames)  # fmt: skip
    ctx.report(tasks=len(chunks), busy=sum(c.seconds for c in chunks), chunk_size=plan.chunk_size)
    return chunks


def write(ctx: Any, plan: Any, chunks: list[Any]) -> list[str]:
    """Index rotation scans (xia2, when installed), rate hits, map grids, write NeXus."""
    from calypso.tasks.mx import run_indexing, write_mx_nexus

    indexing = run_indexing(plan)
    written = write_mx_nexus(plan, chunks, indexing, ctx.provenance)
    print(indexing.message)
    ctx.report(png=written["png"], report=written["report"])
    return written["outputs"]


def write_sample(directory: Path, seed: int = 0) -> str:
    """A 5x7 grid scan of thaumatin stills (Eiger-like, ice in 2 frames); what to run next."""
    from calypso.flows.samples.mx import write_mx_sample

    sample = write_mx_sample(directory, seed=seed)
    return (
        f"raw dataset: {sample.raw_dataset_dir}\n"
        f"mask: {sample.mask}\n"
        f"ground truth: {sample.ground_truth} (grid {sample.grid[0]}x{sample.grid[1]}, "
        f"crystal centred in cell row {sample.crystal_cell[0]}, column "
        f"{sample.crystal_cell[1]})\n"
        f"reduce it with:\n  calypso run mx {sample.raw_dataset_dir} --set mask={sample.mask}"
    )


MX = Technique(
    name="mx",
    description="Find the spots of every image (dispersion threshold), rate hits, map grid "
    "scans and pick the centring position; index rotation scans with xia2 when installed.",
    unit="images",
    parameters_at="calypso.techniques.mx:MXParameters",
    plan_at="calypso.tasks.plans.mx:make_mx_plan",
    count_attribute="n_frames",
    steps=(
        planning_step("mx"),
        Step(
            "mx.find_spots",
            {"plan": "mx.plan"},
            "mx.chunks",
            f"{__name__}:find_spots",
            "spot finding on every image, chunks in parallel",
        ),
        Step(
            "mx.write",
            {"plan": "mx.plan", "chunks": "mx.chunks"},
            OUTPUTS,
            f"{__name__}:write",
            "indexing (xia2, when installed), hit rate, grid map, NeXus",
        ),
    ),
    specification=Path(__file__).with_name("mx.yaml"),
    flow_at="calypso.flows.mx:mx",
    preload="calypso.tasks.mx",
    sample_at=f"{__name__}:write_sample",
)
