"""A toy fifth technique, described through the descriptor alone (nothing in Calypso
changes): the mean and maximum of every frame of an image stack. The test of the same
name runs it from the CLI, from a ``calypso serve`` deployment and as a saved flow.

Calypso finds it through ``CALYPSO_TECHNIQUES=toy_technique:FRAME_STATISTICS`` (with
this folder's parent on PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calypso.errors import ParameterError, RawDataError
from calypso.flows.techniques import OUTPUTS, Option, Step, Technique, planning_step
from calypso.techniques.fields import TechniqueParameters


class FrameStatisticsParameters(TechniqueParameters):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("/data", description="HDF5 path of the image stack.")
    threshold: float = Field(0.0, description="Only pixels above this count (counts).")
    chunk_size: int = Field(4, ge=1, description="Frames per task.")


class FrameStatisticsPlan(BaseModel):
    input: str
    raw: Any = None  # outside the data policy
    output_dir: str
    parameters: FrameStatisticsParameters
    n_frames: int

    def chunks(self) -> list[tuple[int, int]]:
        size = self.parameters.chunk_size
        return [(s, min(s + size, self.n_frames)) for s in range(0, self.n_frames, size)]


def make_plan(input_path, parameters, scans, output_dir, settings, workers) -> FrameStatisticsPlan:
    if output_dir is None:
        raise ParameterError("frame-statistics needs --output DIR")
    try:
        with h5py.File(input_path, "r") as h5:
            n_frames = h5[parameters.dataset].shape[0]
    except (OSError, KeyError) as exc:
        raise RawDataError(f"{input_path}: no image stack at {parameters.dataset}") from exc
    return FrameStatisticsPlan(
        input=str(Path(input_path).absolute()),
        output_dir=str(Path(output_dir).absolute()),
        parameters=parameters,
        n_frames=n_frames,
    )


def frame_statistics(frames: np.ndarray, *, threshold: float) -> np.ndarray:
    """Mean and maximum of the pixels above ``threshold`` (counts), frame by frame."""
    kept = np.where(frames > threshold, frames, 0).astype(np.float64)
    return np.stack([kept.mean(axis=(1, 2)), kept.max(axis=(1, 2))], axis=1)


def measure(ctx: Any, plan: FrameStatisticsPlan) -> list[np.ndarray]:
    from calypso.tasks.progress import collect
    from toy_technique.chunks import measure_chunk

    futures = [measure_chunk.submit(plan, first, stop) for first, stop in plan.chunks()]
    results = collect(futures, plan.n_frames, "Measuring frames", lambda r: len(r[1]))
    ctx.report(tasks=len(results), frames=plan.n_frames)
    return [values for _, values in sorted(results, key=lambda r: r[0])]


def write(ctx: Any, plan: FrameStatisticsPlan, statistics: list[np.ndarray]) -> list[str]:
    from calypso.tasks.writers.nexus import atomic_outputs

    final = Path(plan.output_dir) / "frame_statistics.h5"
    with atomic_outputs(final) as [partial], h5py.File(partial, "w") as h5:
        h5["statistics"] = np.concatenate(statistics)
    return [f"{final}::/statistics"]


def write_sample(directory: Path, seed: int = 0, frames: int = 10) -> str:
    """An image stack where the data policy puts raw data (proposal ih0001)."""
    stack = np.random.default_rng(seed).poisson(5.0, (frames, 16, 16)).astype(np.uint16)
    dataset = directory / "ih0001/id00/20261203/RAW_DATA/stack/stack_0001"
    dataset.mkdir(parents=True, exist_ok=True)
    with h5py.File(dataset / "stack_0001.h5", "w") as h5:
        h5["data"] = stack
    return f"image stack: {dataset / 'stack_0001.h5'}"


FRAME_STATISTICS = Technique(
    name="frame-statistics",
    description="Mean and maximum of every frame of an image stack (a toy technique).",
    unit="frames",
    parameters_at=f"{__name__}:FrameStatisticsParameters",
    plan_at=f"{__name__}:make_plan",
    count_attribute="n_frames",
    steps=(
        planning_step("frame-statistics"),
        Step(
            "frame-statistics.measure",
            {"plan": "frame-statistics.plan"},
            "frame-statistics.values",
            f"{__name__}:measure",
            "mean and maximum of every frame, chunks in parallel",
        ),
        Step(
            "frame-statistics.write",
            {"plan": "frame-statistics.plan", "statistics": "frame-statistics.values"},
            OUTPUTS,
            f"{__name__}:write",
            "one HDF5 file",
        ),
    ),
    specification=Path(__file__).with_name("frame_statistics.yaml"),
    flow_at="toy_technique.flow:frame_statistics",
    preload="toy_technique.chunks",
    sample_at=f"{__name__}:write_sample",
    sample_options=(Option(("--frames",), {"type": int, "default": 10}),),
    concurrency=1,
)
