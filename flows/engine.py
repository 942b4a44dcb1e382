"""The one engine: runs a flow specification (a built-in flow or a saved user flow) step
by step on the run's task runner, and reports it the same way whoever wrote it.

A run plans first (checking the raw data and parameters, claiming the acquisition
when an event started it), then works in a scratch folder of the output folder,
registers the results in the catalogue, exports them when asked, and returns the
summary the CLI prints and the Prefect UI shows.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.executors.flow_runner import flow_task_runner
from calypso.flows.flow_run import FlowRun
from calypso.flows.heartbeats import end_heartbeats_with_the_run
from calypso.flows.runtime import send_prefect_settings_as_objects, share_prefect_tls_context
from calypso.flows.specification import FlowSpec, check_specification
from calypso.flows.techniques import OUTPUTS, TECHNIQUES, Step, Technique, all_steps
from calypso.registry.access.landlock import proposal_confinement, within
from calypso.settings import CalypsoSettings
from calypso.tasks.progress import AsTheyFinish

# Every process that runs a Calypso flow imports this module: the flow's Prefect clients
# there share one TLS context (the workers' do too: executors/worker_setup.py), and the
# task runs it submits carry its Prefect settings as objects.
share_prefect_tls_context()
send_prefect_settings_as_objects()

end_heartbeats_with_the_run()  # every process that runs Calypso's flows imports this module


@dataclass
class StepContext:
    """What every step of one run (or sweep variant) shares, and what the steps report.
    Each step after the planning sees it through :meth:`step`, with a scratch folder of its
    own."""

    run: FlowRun
    raw: str
    scans: list[int] | None
    output_dir: str | None
    work_dir: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)  # key figures for the summary
    tasks: int = 0  # Dask tasks the steps ran
    busy: float = 0.0  # seconds spent inside them
    warnings: list[str] = field(default_factory=list)  # doubts about the results

    @property
    def settings(self) -> CalypsoSettings:
        return self.run.settings

    def report(
        self, *, tasks: int = 0, busy: float = 0.0, warning: str | None = None, **values: Any
    ) -> None:
        """Count a step's tasks and busy seconds; keep its key figures, and what it found
        doubtful (``warning``, the summary's ``warnings``), for the summary."""
        self.tasks += tasks
        self.busy += busy
        if warning:
            self.warnings.append(warning)
        self.values.update(values)

    def step(self, name: str) -> StepContext:
        """This context as step ``name`` sees it: its part files go to a folder of the
        step's own in the run's part folder. Two steps of one task in a user flow write
        part files of the same names (two reduce steps on one plan did, into one folder:
        HDF5 refused the second writer when they met)."""
        folder = Path(self.work_dir) / f"step-{name}"  # no step name holds a "-"
        self.run.make_step_folder(folder)
        return _OneStep(self, str(folder))  # type: ignore[return-value]


class _OneStep:
    """One step's view of its run's context: the run's, but for its scratch folder."""

    def __init__(self, run_context: StepContext, work_dir: str) -> None:
        self._run_context = run_context
        self.work_dir = work_dir

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._run_context, attribute)


# -- planning ------------------------------------------------------------------------

_planned: dict[tuple, Any] = {}  # plans made before the run, by what they were made from


def with_task_runner(technique_flow: Flow, runner: Any) -> Flow:
    """``technique_flow.with_options(task_runner=runner)``, without Prefect building the
    flow again: ``with_options`` derives the parameters' schema anew, ~40 ms of every run
    that ``calypso serve`` does. Prefect copies the runner for each run it starts."""
    on_runner = copy.copy(technique_flow)
    on_runner.task_runner = runner
    return on_runner


def _plan_key(technique: str, raw: str, parameters: BaseModel, scans, output_dir, workers) -> tuple:
    scans = tuple(scans) if scans else None
    return (technique, raw, parameters.model_dump_json(), scans, output_dir, workers)


def remember_plan(
    technique: str, raw: str, parameters: BaseModel, scans, output_dir, workers: int, plan: Any
) -> None:
    """Keep a plan made before the run (the CLI checks the input first), so that the run's
    planning step in this process takes it instead of reading the raw data again."""
    _planned[_plan_key(technique, raw, parameters, scans, output_dir, workers)] = plan


@task(name="make_plan", task_run_name="plan_{technique}", cache_policy=NO_CACHE)
def make_plan(
    technique: str,
    raw: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output_dir: str | None,
    workers: int,
    settings: CalypsoSettings,
) -> Any:
    """Check the raw data and parameters; decide the work (chunks, slabs, batches)."""
    key = _plan_key(technique, raw, parameters, scans, output_dir, workers)
    if key in _planned:
        return _planned.pop(key)
    return plan_in_proposal(technique, raw, parameters, scans, output_dir, settings, workers)


def _write(definition: Step, ctx: StepContext, inputs: dict[str, Any]) -> Any:
    """A writing step, then its result marked partial where a scan it reduces did not end
    well (Bliss's ``end_reason``: aborted, failed), with a warning in the summary: an
    aborted scan reduced offline (by hand, or by the watcher at its end) gave a result
    that looked complete."""
    from calypso.tasks.writers.nexus import mark_scans_that_ended_early

    outputs = definition.run(ctx, **inputs)
    plan = inputs.get("plan")
    output, raw_file = getattr(plan, "output_file", None), getattr(plan, "raw_file", None)
    if not output or not raw_file or Path(raw_file).suffix not in (".h5", ".hdf5", ".nxs"):
        return outputs
    publication = ctx.run.publication
    written = (publication.staged_for(Path(output)) if publication else None) or Path(output)
    if written.is_file():
        lines = mark_scans_that_ended_early(written, Path(raw_file))
        for line in lines:
            ctx.report(warning=f"{line}: its result holds what it recorded, marked partial")
        ctx.run.partial = "; ".join(lines) or ctx.run.partial
    return outputs


def plan_in_proposal(
    technique: str,
    raw: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output_dir: str | None,
    settings: CalypsoSettings,
    workers: int,
) -> Any:
    """The technique's plan of ``raw``, read where the kernel keeps the reads inside the
    input's proposal: a link swapped since the run was checked leads nowhere
    (:mod:`calypso.registry.access.landlock`)."""
    planner = TECHNIQUES[technique].plan()
    confinement = proposal_confinement(settings, raw)
    return within(confinement, planner, raw, parameters, scans, output_dir, settings, workers)


def plan(ctx: StepContext, parameters: BaseModel) -> Any:
    """The planning step of every technique: plan, then claim the acquisition."""
    technique = TECHNIQUES[ctx.run.technique]
    made = make_plan(
        technique.name, ctx.raw, parameters, ctx.scans, ctx.output_dir, ctx.run.workers,
        ctx.settings,
    )  # fmt: skip
    ctx.run.planned(made, getattr(made, technique.count_attribute))
    return made


# -- running a specification ------------------------------------------------------------


def run_specification(
    spec: FlowSpec,
    raw: str,
    *,
    parameters: BaseModel | None = None,
    assignment: dict[str, Any] | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    provenance: dict[str, Any] | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
    steps: dict[str, Step] | None = None,
) -> dict[str, Any]:
    """Run ``spec`` on ``raw``: plan, tasks on Dask, NeXus, catalogue, summary.

    ``parameters`` replaces the planning step's parameters (a built-in flow called
    with a parameter model); ``assignment`` (``{"step.parameter": value}``) sets swept
    values of one variant. With the ``trigger`` key of an acquisition event, an
    acquisition processed already is skipped. ``steps`` (default: every step) lets live
    reduction run the same specification with steps fed by a scan in progress.
    """
    steps = steps or all_steps()
    technique = TECHNIQUES[spec.technique]
    assignment = assignment or {}
    run = FlowRun(technique.name, raw=raw, export_to=export_to, trigger=trigger)
    ctx = StepContext(run=run, raw=raw, scans=scans, output_dir=output_dir)
    ctx.provenance = {"flow_run_id": run.run_id, "input": raw, **(provenance or {})}
    if assignment:
        ctx.provenance["sweep"] = assignment
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def call(name: str) -> Any:
        step = spec.steps[name]
        definition = steps[step["task"]]
        inputs = {port: results[source] for port, source in (step.get("inputs") or {}).items()}
        if definition.takes_parameters:
            inputs["parameters"] = parameters or _parameters(definition, name, step, assignment)
            return definition.run(ctx, **inputs)  # before the run's part folder exists
        if definition.output == OUTPUTS:
            # The writer reads the raw data again (the groups its result links to, a
            # quick look's frame) and writes the staged results: where the kernel keeps
            # both inside the proposal (a folder swapped since the check leads nowhere).
            confinement = proposal_confinement(ctx.settings, raw)
            return within(confinement, _write, definition, ctx.step(name), inputs)
        return definition.run(ctx.step(name), **inputs)

    planning = [name for name in spec.order if steps[spec.steps[name]["task"]].takes_parameters]
    with run.ending_registered():
        for name in planning:
            results[name] = call(name)
        if run.skipped_because:  # this acquisition was processed by this flow already
            return run.skipped()
        outputs: list[str] = []
        with run.working() as work_dir:
            ctx.work_dir = work_dir
            for name in spec.order:
                if name in results:
                    continue
                began = time.perf_counter()
                results[name] = call(name)
                timings[name] = time.perf_counter() - began
                if steps[spec.steps[name]["task"]].output == OUTPUTS:
                    outputs = results[name]
            for result in results.values():  # results no step took: they end with the run
                if isinstance(result, AsTheyFinish):
                    list(result)
        registration = run.completed(outputs)
    summary = run.summary(
        raw,
        outputs,
        registration,
        unit=technique.unit,
        tasks=ctx.tasks,
        timings=timings | {"busy_in_tasks": ctx.busy},
        warnings=ctx.warnings,
        **ctx.values,
        **({"sweep": assignment} if assignment else {}),
    )
    if technique.rate_name:
        summary[technique.rate_name] = summary["per_s"]
    return summary


def _parameters(definition, name: str, step: dict, assignment: dict[str, Any]) -> BaseModel:
    values = {**(step.get("parameters") or {})}
    for key, value in assignment.items():
        step_name, parameter = key.split(".", 1)
        if step_name == name:
            values[parameter] = value
    return definition.parameter_model()(**values)


# -- the built-in flows -------------------------------------------------------------


@cache
def builtin_specification(technique: str) -> FlowSpec:
    """The built-in flow of ``technique``, checked like any user flow."""
    path = TECHNIQUES[technique].specification
    return check_specification(path.read_text(), str(path))


def technique_flow(technique: Technique, module: str) -> Flow:
    """The Prefect flow of a technique, named after it, in ``module``: a thin entry point
    (the form of the Prefect UI, deployments, scripts) around its built-in
    specification, run by :func:`run_specification`."""
    model = technique.parameters()

    def run(
        raw: str,
        parameters: model | None = None,  # type: ignore[valid-type]
        scans: list[int] | None = None,
        output_dir: str | None = None,
        export_to: str | None = None,
        trigger: str | None = None,
    ) -> dict[str, Any]:
        # Started by a deployment (an acquisition event, the Prefect UI, a worker): nobody
        # checked it before, so the service confines it (the CLI checked its caller).
        from calypso.registry.access import served_run, service_identity

        if served_run():
            from calypso.flows.api import confine_run
            from calypso.settings import load_settings

            settings = load_settings()
            confine_run(
                technique.name, raw, parameters or model(), output_dir, settings,
                service_identity(settings), export_to,
            )  # fmt: skip
        return run_specification(
            builtin_specification(technique.name),
            raw,
            parameters=parameters or model(),
            scans=scans,
            output_dir=output_dir,
            export_to=export_to,
            trigger=trigger,
        )

    # Prefect finds a deployment's flow by module and name, and shows the docstring.
    run.__name__ = run.__qualname__ = technique.name.replace("-", "_")
    run.__module__ = module
    run.__doc__ = technique.description
    run.__annotations__["parameters"] = model | None
    return flow(
        name=technique.name,
        persist_result=False,
        log_prints=True,
        task_runner=flow_task_runner([technique.preload]),
    )(run)
