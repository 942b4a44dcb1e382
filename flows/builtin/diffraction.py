"""Diffraction: azimuthal integration of every frame of a scan with pyFAI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calypso.flows.techniques import OUTPUTS, Option, Step, Technique, planning_step


def integrate(ctx: Any, plan: Any) -> list[Any]:
    """Every chunk of frames integrated on the task runner; results as they finish."""
    from calypso.tasks.diffraction import integrate_chunk
    from calypso.tasks.progress import collect

    futures = [
        integrate_chunk.submit(chunk, plan.parameters, plan.geometry, plan.raw_file, ctx.work_dir)
        for chunk in plan.chunks()
    ]
    chunks = collect(
        futures, plan.n_frames, f"Integrating {plan.n_frames} frames", lambda r: r.stop - r.start
    )
    ctx.report(**chunk_figures(plan, chunks))
    return chunks


def chunk_figures(plan: Any, chunks: list[Any]) -> dict[str, Any]:
    """What the integration step reports of its chunks (offline and live alike)."""
    empty = sorted((c.scan, frame) for c in chunks for frame in getattr(c, "empty_frames", []))
    warning = (
        f"{len(empty)} frames hold no finite pixel (first: scan {empty[0][0]} frame "
        f"{empty[0][1]}): their patterns are empty (0) and count in the scan's mean"
        if empty
        else None
    )
    return {
        "warning": warning,
        "tasks": len(chunks),
        "busy": sum(c.seconds for c in chunks),
        "frames": plan.n_frames,
        "chunks": len(chunks),
        "chunk_size": plan.chunk_size,
        "workers": sorted({c.worker for c in chunks}),
        # Chunks the command did while Prefect's server started (calypso.tasks.head_start).
        "head_start_chunks": sum(getattr(c, "head_start", False) for c in chunks),
    }


def write(ctx: Any, plan: Any, chunks: list[Any]) -> list[str]:
    from calypso.tasks.diffraction import quick_look_path, write_integrated_nexus
    from calypso.tasks.writers.publication import will_exist

    outputs = write_integrated_nexus(plan, chunks, ctx.provenance)
    look = quick_look_path(plan)
    ctx.report(png=str(look) if will_exist(look) else None)  # published with the record
    return outputs


def demo_settings(calibration: dict[str, Path]) -> list[str]:
    """The parameters the sample data is reduced with (its calibration, monitor, unit)."""
    return [
        f"poni={calibration['poni']}",
        f"mask={calibration['mask']}",
        "monitor=mon",
        "monitor_reference=1e5",
        "unit=2th_deg",
    ]


def write_sample(directory: Path, seed: int = 0, frames: int = 100) -> str:
    """Simulated Pilatus 1M frames of CeO2 in the Bliss layout; what to run next."""
    from calypso.errors import ParameterError
    from calypso.flows.samples.diffraction import write_diffraction_sample

    if frames < 1:
        raise ParameterError("--frames must be at least 1")
    sample = write_diffraction_sample(directory, frames=frames, seed=seed)
    lines = [f"raw dataset: {sample.raw_dataset_dir}"]
    lines += [f"{name}: {path}" for name, path in sample.calibration.items()]
    settings = " ".join(f"--set {s}" for s in demo_settings(sample.calibration))
    lines.append(f"reduce it with:\n  calypso run diffraction {sample.raw_dataset_dir} {settings}")
    return "\n".join(lines)


DIFFRACTION = Technique(
    name="diffraction",
    description="Integrate the frames of a raw dataset azimuthally (pyFAI) and write NeXus "
    "patterns; chunks of frames in parallel on Dask.",
    unit="frames",
    parameters_at="calypso.techniques.diffraction:DiffractionParameters",
    plan_at="calypso.tasks.plans.diffraction:make_integration_plan",
    parameter_file_at="calypso.tasks.raw.pyfai_config:read_pyfai_config",
    count_attribute="n_frames",
    steps=(
        planning_step("diffraction"),
        Step(
            "diffraction.integrate",
            {"plan": "diffraction.plan"},
            "diffraction.chunks",
            f"{__name__}:integrate",
            "azimuthal integration of every frame, chunks in parallel",
        ),
        Step(
            "diffraction.write",
            {"plan": "diffraction.plan", "chunks": "diffraction.chunks"},
            OUTPUTS,
            f"{__name__}:write",
            "NeXus (and ASCII) patterns",
        ),
    ),
    specification=Path(__file__).with_name("diffraction.yaml"),
    flow_at="calypso.flows.diffraction:diffraction",
    preload="calypso.tasks.diffraction",
    threaded_chunks=True,  # pyFAI's kernels release the GIL; integrators lent per thread
    head_start_at="calypso.tasks.diffraction:plan_head_start",
    sample_at=f"{__name__}:write_sample",
    sample_options=(
        Option(("--frames",), {"type": int, "default": 100, "help": "frames in the scan"}),
    ),
    concurrency=2,
    rate_name="frames_per_s",
)
