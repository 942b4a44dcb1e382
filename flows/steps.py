"""The steps a user flow may use: Calypso's own tasks, in the stages of the built-in flows.

Each step has typed inputs (the outputs of earlier steps) and one typed output;
a ``<technique>.plan`` step also takes the technique's parameters (its pydantic
model, so they are checked as in ``calypso run``). A user flow runs only these
steps, never code of its own. The stages call the same Prefect tasks, in the same
order, as the built-in flows, so a built-in flow exported as a specification
gives the same results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from calypso.flows.techniques import TECHNIQUES

OUTPUTS = "outputs"  # the type of a step that writes results: the run's end


@dataclass
class StepContext:
    """What every step of one run (or sweep variant) shares."""

    run: Any  # tasks.catalogue.FlowRun
    raw: str
    scans: list[int] | None
    output_dir: str | None
    work_dir: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)  # key figures for the summary


@dataclass(frozen=True)
class Step:
    name: str
    technique: str
    inputs: dict[str, str]  # port -> type
    output: str
    run: Callable[..., Any]
    description: str
    takes_parameters: bool = False

    def parameter_model(self) -> type[BaseModel] | None:
        return TECHNIQUES[self.technique].parameters() if self.takes_parameters else None


_PLANNERS = {
    "diffraction": "plan_integration",
    "spectroscopy": "plan_spectroscopy",
    "tomography": "plan_tomography",
    "mx": "plan_mx",
}


def _plan(technique: str, count_attribute: str) -> Callable[..., Any]:
    def plan(ctx: StepContext, parameters: BaseModel) -> Any:
        from importlib import import_module

        planner = getattr(import_module(f"calypso.tasks.{technique}"), _PLANNERS[technique])
        made = planner(ctx.raw, parameters, ctx.scans, ctx.output_dir, ctx.run.workers)
        ctx.run.planned(made, getattr(made, count_attribute))
        return made

    return plan


def _diffraction_integrate(ctx: StepContext, plan: Any) -> Any:
    from calypso.flows.diffraction import integrate_all_chunks

    return integrate_all_chunks(plan, ctx.work_dir)


def _diffraction_write(ctx: StepContext, plan: Any, chunks: Any) -> list[str]:
    from calypso.tasks.diffraction import write_integrated_nexus

    return write_integrated_nexus(plan, chunks, ctx.provenance)


def _spectroscopy_reduce(ctx: StepContext, plan: Any) -> Any:
    from calypso.flows.spectroscopy import reduce_all_batches
    from calypso.tasks.spectroscopy import merge_repeated_scans

    batches = reduce_all_batches(plan, ctx.work_dir)
    if plan.merges:
        batches.append(merge_repeated_scans(plan, batches, ctx.work_dir))
    return batches


def _spectroscopy_write(ctx: StepContext, plan: Any, batches: Any) -> list[str]:
    from calypso.tasks.spectroscopy import write_spectroscopy_nexus

    written = write_spectroscopy_nexus(plan, batches, ctx.provenance)
    ctx.values.update(png=written["png"], key_figures=written["key_figures"])
    return written["outputs"]


def _tomography_center(ctx: StepContext, plan: Any) -> Any:
    from calypso.tasks.tomography import find_center_of_rotation

    center = find_center_of_rotation.submit(plan).result()
    ctx.values.update(center_of_rotation=center.value, center_of_rotation_method=center.method)
    return center


def _tomography_reconstruct(ctx: StepContext, plan: Any, center: Any) -> Any:
    from calypso.flows.tomography import reconstruct_all_slabs
    from calypso.tasks.tomography import reconstruct_preview

    if plan.preview:
        return reconstruct_preview.submit(plan, center, ctx.work_dir).result()
    return reconstruct_all_slabs(plan, center, ctx.work_dir)


def _tomography_write(ctx: StepContext, plan: Any, center: Any, slices: Any) -> list[str]:
    from calypso.tasks.tomography import write_preview_nexus, write_volume_nexus

    if plan.preview:
        written = write_preview_nexus(plan, center, slices, ctx.provenance)
    else:
        written = write_volume_nexus(plan, center, slices, ctx.work_dir, ctx.provenance)
    ctx.values.update(png=written["png"])
    return written["outputs"]


def _mx_find_spots(ctx: StepContext, plan: Any) -> Any:
    from calypso.flows.mx import find_all_spots

    return find_all_spots(plan, ctx.work_dir)


def _mx_write(ctx: StepContext, plan: Any, chunks: Any) -> list[str]:
    from calypso.tasks.mx import run_indexing, write_mx_nexus

    written = write_mx_nexus(plan, chunks, run_indexing(plan), ctx.provenance)
    ctx.values.update(png=written["png"], report=written["report"])
    return written["outputs"]


def _steps() -> dict[str, Step]:
    found = []
    for technique in TECHNIQUES.values():
        name = technique.name
        found.append(
            Step(
                f"{name}.plan",
                name,
                {},
                f"{name}.plan",
                _plan(name, technique.count_attribute),
                f"check the raw data and plan the {name} work (the technique's parameters)",
                takes_parameters=True,
            )
        )
    found += [
        Step(
            "diffraction.integrate",
            "diffraction",
            {"plan": "diffraction.plan"},
            "diffraction.chunks",
            _diffraction_integrate,
            "azimuthal integration of every frame, chunks in parallel",
        ),
        Step(
            "diffraction.write",
            "diffraction",
            {"plan": "diffraction.plan", "chunks": "diffraction.chunks"},
            OUTPUTS,
            _diffraction_write,
            "NeXus (and ASCII) patterns",
        ),
        Step(
            "spectroscopy.reduce",
            "spectroscopy",
            {"plan": "spectroscopy.plan"},
            "spectroscopy.batches",
            _spectroscopy_reduce,
            "mu(E), calibration, normalisation, EXAFS in batches; merge of repeats",
        ),
        Step(
            "spectroscopy.write",
            "spectroscopy",
            {"plan": "spectroscopy.plan", "batches": "spectroscopy.batches"},
            OUTPUTS,
            _spectroscopy_write,
            "NeXus, XDI and the quick-look plot",
        ),
        Step(
            "tomography.center_of_rotation",
            "tomography",
            {"plan": "tomography.plan"},
            "tomography.center",
            _tomography_center,
            "centre of rotation (search, or the given value)",
        ),
        Step(
            "tomography.reconstruct",
            "tomography",
            {"plan": "tomography.plan", "center": "tomography.center"},
            "tomography.slices",
            _tomography_reconstruct,
            "flat field, rings, Paganin, back-projection of slabs in parallel (or a preview)",
        ),
        Step(
            "tomography.write",
            "tomography",
            {
                "plan": "tomography.plan",
                "center": "tomography.center",
                "slices": "tomography.slices",
            },
            OUTPUTS,
            _tomography_write,
            "the NeXus volume (or preview) and the quick-look plot",
        ),
        Step(
            "mx.find_spots",
            "mx",
            {"plan": "mx.plan"},
            "mx.chunks",
            _mx_find_spots,
            "spot finding on every image, chunks in parallel",
        ),
        Step(
            "mx.write",
            "mx",
            {"plan": "mx.plan", "chunks": "mx.chunks"},
            OUTPUTS,
            _mx_write,
            "indexing (xia2, when installed), hit rate, grid map, NeXus",
        ),
    ]
    return {step.name: step for step in found}


STEPS: dict[str, Step] = _steps()

# The built-in flows, as the steps they are made of (name, step, inputs).
BUILT_IN: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    "diffraction": [
        ("plan", "diffraction.plan", {}),
        ("integrate", "diffraction.integrate", {"plan": "plan"}),
        ("write", "diffraction.write", {"plan": "plan", "chunks": "integrate"}),
    ],
    "spectroscopy": [
        ("plan", "spectroscopy.plan", {}),
        ("reduce", "spectroscopy.reduce", {"plan": "plan"}),
        ("write", "spectroscopy.write", {"plan": "plan", "batches": "reduce"}),
    ],
    "tomography": [
        ("plan", "tomography.plan", {}),
        ("center", "tomography.center_of_rotation", {"plan": "plan"}),
        ("reconstruct", "tomography.reconstruct", {"plan": "plan", "center": "center"}),
        (
            "write",
            "tomography.write",
            {"plan": "plan", "center": "center", "slices": "reconstruct"},
        ),
    ],
    "mx": [
        ("plan", "mx.plan", {}),
        ("find_spots", "mx.find_spots", {"plan": "plan"}),
        ("write", "mx.write", {"plan": "plan", "chunks": "find_spots"}),
    ],
}
