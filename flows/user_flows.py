"""User flows: a YAML specification of registered steps, checked, then run like a built-in.

A specification::

    calypso: 1                      # format version
    description: rings, then a sweep of the rotation axis on three slices
    steps:
      plan:
        task: tomography.plan
        parameters: {rows: [10, 13], center_of_rotation: {start: 94, stop: 98, step: 1}}
      center: {task: tomography.center_of_rotation, inputs: {plan: plan}}
      slices: {task: tomography.reconstruct, inputs: {plan: plan, center: center}}
      write: {task: tomography.write, inputs: {plan: plan, center: center, slices: slices}}

Every problem (unknown task or parameter, mistyped value, missing or unknown input,
input of the wrong type, cycle ...) is reported at once, each with its place in the
file. A parameter given as a list (or ``{start, stop, step}``) is a sweep: one
variant a value (the product of several), run in parallel, each written to its own
folder. Paths a user flow reads or writes stay inside its proposal.
"""

from __future__ import annotations

import contextvars
import difflib
import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from pydantic import ValidationError

from calypso.errors import DataPolicyError, ParameterError
from calypso.executors.dask import flow_task_runner
from calypso.flows.steps import BUILT_IN, OUTPUTS, STEPS, StepContext

FORMAT = 1
_TOP = {"calypso", "name", "description", "steps"}
_STEP_KEYS = {"task", "inputs", "parameters", "description"}
_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecificationError(ParameterError):
    """A user flow specification with problems; the message lists all of them."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass
class FlowSpec:
    """A checked specification: steps in an order that respects their inputs."""

    text: str
    steps: dict[str, dict[str, Any]]
    order: list[str]
    technique: str
    description: str = ""
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # "step.parameter" -> values

    def variants(self) -> list[dict[str, Any]]:
        """One assignment ``{"step.parameter": value}`` per combination of swept values."""
        names = list(self.sweep)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*self.sweep.values())
        ] or [{}]


# -- reading and checking ---------------------------------------------------------


def _line_numbers(text: str) -> dict[tuple[str, ...], int]:
    """Line of every mapping key and value in the YAML, by its path of keys."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _range(value: dict[str, Any]) -> list[float]:
    start, stop, step = value["start"], value["stop"], value.get("step", 1)
    if not step or (stop - start) / step < 0:
        raise ValueError("step must be non-zero and go from start towards stop")
    count = round((stop - start) / step) + 1
    if count > 1000:
        raise ValueError(f"{count} values: at most 1000")
    return [round(start + i * step, 10) for i in range(count)]


def check_specification(text: str, source: str = "specification") -> FlowSpec:
    """Parse and check a specification; raise :class:`SpecificationError` listing every
    problem with its place (``line N, steps.center.inputs.plan``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise SpecificationError(source, [f"{where}: not valid YAML ({exc})"]) from None
    lines = _line_numbers(text)
    problems: list[str] = []

    def problem(path: tuple[str, ...], message: str) -> None:
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), 1)
        problems.append(f"line {line}, {'.'.join(path) or 'top'}: {message}")

    if not isinstance(data, dict):
        raise SpecificationError(source, ["line 1, top: expected a mapping with `steps`"])
    for key in sorted(set(data) - _TOP):
        problem((key,), f"unknown field (known: {', '.join(sorted(_TOP))})")
    if data.get("calypso", FORMAT) != FORMAT:
        problem(("calypso",), f"format {data.get('calypso')!r} is not supported (use {FORMAT})")
    steps = data.get("steps")
    if not isinstance(steps, dict) or not steps:
        problem(("steps",), "expected a mapping of named steps")
        raise SpecificationError(source, problems)

    outputs: dict[str, str] = {}
    techniques: set[str] = set()
    sweep: dict[str, list[Any]] = {}
    graph: dict[str, set[str]] = {}
    for name, step in steps.items():
        here = ("steps", str(name))
        if not _STEP_NAME.match(str(name)):
            problem(here, "a step name is lower-case letters, digits and _ (e.g. find_center)")
        if not isinstance(step, dict):
            problem(here, "expected a mapping with `task` (and `inputs`, `parameters`)")
            continue
        for key in sorted(set(step) - _STEP_KEYS):
            problem((*here, key), f"unknown field (known: {', '.join(sorted(_STEP_KEYS))})")
        task = step.get("task")
        definition = STEPS.get(task) if isinstance(task, str) else None
        if definition is None:
            close = difflib.get_close_matches(str(task), STEPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listing = "`calypso flows tasks` lists them"
            problem((*here, "task"), f"unknown task {task!r}{hint}; {listing}")
            continue
        outputs[name] = definition.output
        techniques.add(definition.technique)
        sweep.update(_check_parameters(step.get("parameters"), definition, here, problem))
        inputs = step.get("inputs") or {}
        if not isinstance(inputs, dict):
            problem((*here, "inputs"), "expected a mapping of input name to step name")
            inputs = {}
        for port in sorted(set(definition.inputs) - set(inputs)):
            problem((*here, "inputs"), f"missing input {port!r} ({definition.inputs[port]})")
        for port in sorted(set(inputs) - set(definition.inputs)):
            known = ", ".join(definition.inputs) or "none"
            problem((*here, "inputs", str(port)), f"{task} has no input {port!r} (inputs: {known})")
        graph[name] = {str(v) for v in inputs.values()}
    for name, step in steps.items():
        if not isinstance(step, dict) or step.get("task") not in STEPS:
            continue
        definition = STEPS[step["task"]]
        for port, source_step in (step.get("inputs") or {}).items():
            if port not in definition.inputs:
                continue
            where = ("steps", str(name), "inputs", str(port))
            if source_step not in steps:
                problem(where, f"no step named {source_step!r}")
            elif source_step in outputs and outputs[source_step] != definition.inputs[port]:
                problem(
                    where,
                    f"{source_step!r} gives {outputs[source_step]}, but {port!r} takes "
                    f"{definition.inputs[port]}",
                )
    order: list[str] = []
    try:
        order = list(TopologicalSorter(graph).static_order())
        order = [name for name in order if name in steps]
    except CycleError as exc:
        cycle = " -> ".join(str(n) for n in exc.args[1])
        problem(("steps",), f"the inputs form a cycle: {cycle}")
    finals = [n for n, out in outputs.items() if out == OUTPUTS]
    if len(finals) != 1:
        problem(("steps",), f"exactly one step must write results (a *.write task); found {finals}")
    if len(techniques) > 1:
        problem(("steps",), f"one technique a flow; found {', '.join(sorted(techniques))}")
    if problems:
        raise SpecificationError(source, problems)
    return FlowSpec(
        text=text,
        steps=steps,
        order=order,
        technique=techniques.pop(),
        description=str(data.get("description") or ""),
        sweep=sweep,
    )


def _check_parameters(parameters: Any, definition, here, problem) -> dict[str, list[Any]]:
    """Check a step's parameters against its model; return the swept ones' values."""
    model = definition.parameter_model()
    if parameters is None:
        return {}
    if model is None:
        problem((*here, "parameters"), f"{definition.name} takes no parameters")
        return {}
    if not isinstance(parameters, dict):
        problem((*here, "parameters"), "expected a mapping of parameter name to value")
        return {}
    sweep: dict[str, list[Any]] = {}
    single: dict[str, Any] = {}
    for name, value in parameters.items():
        where = (*here, "parameters", str(name))
        if name not in model.model_fields:
            close = difflib.get_close_matches(str(name), model.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problem(where, f"unknown {definition.technique} parameter{hint}")
            continue
        values = _sweep_values(value, model, name)
        if isinstance(values, str):
            problem(where, values)
        elif values is not None:
            sweep[f"{here[1]}.{name}"] = values
            single[name] = values[0]
            for other in values[1:]:  # every value must be valid, not only the first
                _validate(model, {name: other}, where, problem)
            continue
        else:
            single[name] = value
    _validate(model, single, (*here, "parameters"), problem)
    return sweep


def _sweep_values(value: Any, model, name: str) -> list[Any] | str | None:
    """The values of a swept parameter, an error message, or None (not a sweep)."""
    if isinstance(value, dict) and {"start", "stop"} <= set(value):
        try:
            return _range(value)
        except (TypeError, ValueError, KeyError) as exc:
            return f"bad range {value}: {exc}"
    if isinstance(value, list):
        try:  # a list the parameter itself takes (rows: [10, 13]) is not a sweep
            model(**{name: value})
            return None
        except ValidationError:
            pass
        if not value:
            return "an empty list sweeps nothing"
        return list(value)
    return None


def _validate(model, values: dict[str, Any], where, problem) -> None:
    try:
        model(**values)
    except ValidationError as exc:
        for error in exc.errors():
            path = (*where[:-1], "parameters", *map(str, error["loc"]))
            if where[-1] != "parameters":
                path = where
            problem(path, f"{error['msg']} (got {error.get('input')!r})")


def export_specification(technique: str) -> str:
    """A built-in flow as a specification to start from (its default parameters shown)."""
    from calypso.flows.techniques import TECHNIQUES

    defaults = TECHNIQUES[technique].parameters()().model_dump(mode="json", exclude_none=True)
    steps: dict[str, Any] = {}
    for name, task, inputs in BUILT_IN[technique]:
        step: dict[str, Any] = {"task": task}
        if inputs:
            step["inputs"] = inputs
        if STEPS[task].takes_parameters:
            step["parameters"] = defaults
        steps[name] = step
    header = (
        f"# The built-in {technique} flow as a Calypso user flow. Edit the parameters (a list\n"
        "# or {start, stop, step} sweeps one), check it with `calypso flows check FILE`, keep\n"
        "# it with `calypso flows save FILE --name NAME`.\n"
    )
    body = {"calypso": FORMAT, "description": f"built-in {technique} flow", "steps": steps}
    return header + yaml.safe_dump(body, sort_keys=False)


# -- confinement -----------------------------------------------------------------


def confine(raw: str, output: str | None, spec: FlowSpec, proposal: str | None, roots) -> None:
    """Refuse paths that leave the proposal: the raw dataset (read-only), the output folder
    and every path-like parameter; ``..``, absolute paths elsewhere, symlinks out."""
    from calypso.tasks.data_policy import RawDataset

    if ".." in Path(raw).parts:
        raise DataPolicyError(f"refused: {raw}: '..' is not allowed in a user flow's paths")
    problems = []
    dataset = RawDataset.from_path(raw)
    if proposal and dataset.proposal != proposal:
        problems.append(f"{raw} belongs to proposal {dataset.proposal}, the flow to {proposal}")
    proposal_dir = (dataset.root / dataset.proposal).resolve()
    if roots and not any(proposal_dir.is_relative_to(Path(r).resolve()) for r in roots):
        problems.append(f"{raw} is outside the data roots")

    def inside(path: str, what: str) -> None:
        if ".." in Path(path).parts:
            problems.append(f"{what} {path}: '..' is not allowed in a user flow's paths")
        elif not Path(path).resolve().is_relative_to(proposal_dir):
            problems.append(f"{what} {path} leads outside proposal {dataset.proposal}")

    inside(raw, "raw dataset")
    if output:
        inside(output, "output folder")
    for name, step in spec.steps.items():
        for key, value in (step.get("parameters") or {}).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and ("/" in item or item.startswith("~")):
                    inside(item, f"steps.{name}.parameters.{key}")
    if problems:
        raise DataPolicyError("refused: " + "; ".join(problems))


# -- running -------------------------------------------------------------------


def run_variant(
    spec: FlowSpec,
    assignment: dict[str, Any],
    raw: str,
    scans: list[int] | None,
    output_dir: str | None,
    provenance: dict[str, Any],
    trigger: str | None = None,
) -> dict[str, Any]:
    """One variant of a user flow, through the built-in machinery: plan, Dask tasks,
    NeXus (with the specification in its NXprocess provenance), catalogue. With the
    ``trigger`` key of an acquisition event, a variant already processed is skipped."""
    from calypso.tasks.catalogue import FlowRun

    run = FlowRun(spec.technique, raw=raw, trigger=trigger)
    ctx = StepContext(run=run, raw=raw, scans=scans, output_dir=output_dir)
    ctx.provenance = {"flow_run_id": run.run_id, "input": raw, **provenance}
    if assignment:
        ctx.provenance["sweep"] = assignment
    results: dict[str, Any] = {}
    outputs: list[str] = []

    def call(name: str) -> Any:
        step = spec.steps[name]
        definition = STEPS[step["task"]]
        arguments = {port: results[source] for port, source in (step.get("inputs") or {}).items()}
        if definition.takes_parameters:
            values = {**(step.get("parameters") or {})}
            for key, value in assignment.items():
                step_name, parameter = key.split(".", 1)
                if step_name == name:
                    values[parameter] = value
            arguments["parameters"] = definition.parameter_model()(**values)
        return definition.run(ctx, **arguments)

    planned = [n for n in spec.order if STEPS[spec.steps[n]["task"]].takes_parameters]
    for name in planned:
        results[name] = call(name)
    if run.skipped_because:  # this acquisition was processed by this flow already
        return run.skipped()
    with run.working() as work_dir:
        ctx.work_dir = work_dir
        for name in spec.order:
            if name in results:
                continue
            results[name] = call(name)
            if STEPS[spec.steps[name]["task"]].output == OUTPUTS:
                outputs = results[name]
    registration = run.completed(outputs)
    return run.summary(
        raw,
        outputs,
        registration,
        unit=_unit(spec.technique),
        tasks=len(spec.order),
        timings={},
        sweep=assignment,
        **ctx.values,
    )


def _unit(technique: str) -> str:
    from calypso.flows.techniques import TECHNIQUES

    return TECHNIQUES[technique].unit


def variant_folder(base: str, assignment: dict[str, Any]) -> str:
    parts = [f"{key.split('.', 1)[1]}_{value}" for key, value in assignment.items()]
    return str(Path(base) / "sweep" / "_".join(parts).replace("/", "-"))


def run_user_flow_variants(
    spec: FlowSpec,
    raw: str,
    scans: list[int] | None,
    output_dir: str,
    provenance: dict[str, Any],
    trigger: str | None = None,
) -> list[dict[str, Any]]:
    """Every variant of the sweep (one without a sweep), in parallel: their tasks share
    the Dask cluster, each writes its own folder."""
    variants = spec.variants()
    if len(variants) == 1 and not variants[0]:
        return [run_variant(spec, {}, raw, scans, output_dir, provenance, trigger)]
    with ThreadPoolExecutor(max_workers=min(8, len(variants))) as pool:
        # Each variant's thread runs in a copy of this flow run's context (Prefect's
        # run context is a context variable), so its tasks go to the same task runner.
        futures = [
            pool.submit(
                contextvars.copy_context().run,
                run_variant,
                spec,
                assignment,
                raw,
                scans,
                variant_folder(output_dir, assignment),
                provenance,
                trigger,
            )
            for assignment in variants
        ]
        return [future.result() for future in futures]


def default_output(raw: str, technique: str, name: str, version: int) -> str:
    """Beside the built-in results: ``<processed dataset>/<technique>_<flow>_v<version>``."""
    from calypso.settings import load_settings
    from calypso.tasks.data_policy import RawDataset

    policy = load_settings().processed_data
    folder = RawDataset.from_path(raw).processed_dataset_dir(None, policy)
    return str(folder / f"{technique}_{name}_v{version}")


@flow(
    name="user-flow",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("diffraction"),
)
def user_flow(
    name: str,
    version: int,
    specification: str,
    raw: str,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Run a saved user flow (its specification, as saved) on a raw dataset."""
    spec = check_specification(specification, f"{name}@{version}")
    output = output_dir or default_output(raw, spec.technique, name, version)
    provenance = {"user_flow": {"name": name, "version": version, "specification": specification}}
    variants = run_user_flow_variants(spec, raw, scans, output, provenance, trigger)
    return {"flow": f"{name}@{version}", "technique": spec.technique, "variants": variants}


@flow(
    name="saved-flow",
    persist_result=False,
    log_prints=True,
    task_runner=flow_task_runner("diffraction"),
)
def saved_flow(
    name: str,
    raw: str,
    version: int | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Run a saved user flow (latest version unless ``version``) on a raw dataset inside
    its proposal: the form `calypso serve` offers in the Prefect UI, also started by
    acquisition events for rules ``technique = "flow:NAME"``."""
    from calypso.registry.saved_flows import SavedFlows
    from calypso.settings import load_settings

    settings = load_settings()
    saved = SavedFlows(settings.catalogue_path).get(name, version)
    spec = check_specification(saved.specification, saved.label)
    confine(raw, output_dir, spec, saved.proposal, settings.data_roots)
    return user_flow(
        name=saved.name,
        version=saved.version,
        specification=saved.specification,
        raw=raw,
        scans=scans,
        output_dir=output_dir,
        trigger=trigger,
    )
