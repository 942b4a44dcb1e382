"""Flow specifications: the YAML format of built-in and user flows, read and checked.

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
variant a value (the product of several). The built-in flows are specifications in
this format too (``flows/builtin/*.yaml``).

A specification is bounded (:class:`calypso.settings.UserFlowSettings`): its size, any
one list or string, how deep it nests, and the number of variants, which is counted
(never enumerated) before any value is built. YAML anchors and aliases are refused as
the document is composed: they are what lets a kilobyte expand into gigabytes.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import reprlib
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any

import yaml
from pydantic import ValidationError

from calypso.errors import ParameterError
from calypso.flows.techniques import OUTPUTS, TECHNIQUES, all_steps
from calypso.settings import UserFlowSettings, load_settings

FORMAT = 1
_TOP = {"calypso", "name", "description", "steps"}
_STEP_KEYS = {"task", "inputs", "parameters", "description"}
_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SETTING = "CALYPSO_USER_FLOWS__"  # how to raise a limit, named in the problem
# Composing YAML recurses once a level: a file of 100,000 "[" would overflow the stack.
# A specification needs about six levels (steps.plan.parameters.rows.0).
_MAX_DEPTH = 32


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


class _Refused(yaml.YAMLError):
    """Something that stops composing at once (before it can expand or recurse)."""

    def __init__(self, line: int, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.problem = f"line {line}, {'.'.join(path) or 'top'}: {message}"


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and deep nesting as each node is
    composed, and notes lists and strings over the limits, so that nothing is built from
    a document before it is known to be small."""

    def __init__(self, text: str, limits: UserFlowSettings) -> None:
        super().__init__(text)
        self.limits = limits
        self.paths: list[tuple[str, ...]] = [()]  # path of keys of each node being composed
        self.problems: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        path = self.paths[-1]
        if isinstance(index, yaml.ScalarNode):  # a mapping's value, under its key
            path = (*path, str(index.value))
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                line,
                path,
                "YAML anchors and aliases (&name, *name) are not allowed: a specification "
                "has no use for them, and they let a small file expand without bound; "
                "write each value out",
            )
        if len(self.paths) > _MAX_DEPTH:
            raise _Refused(line, path, f"nested more than {_MAX_DEPTH} levels deep")
        self.paths.append(path)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.paths.pop()
        where = f"line {line}, {'.'.join(path) or 'top'}"
        limits = self.limits
        if isinstance(node, yaml.SequenceNode) and len(node.value) > limits.max_list_items:
            self.problems.append(
                f"{where}: a list of {len(node.value):,} items: at most "
                f"{limits.max_list_items:,} ({_SETTING}MAX_LIST_ITEMS)"
            )
        elif isinstance(node, yaml.ScalarNode) and len(node.value) > limits.max_string_chars:
            self.problems.append(
                f"{where}: a value of {len(node.value):,} characters: at most "
                f"{limits.max_string_chars:,} ({_SETTING}MAX_STRING_CHARS)"
            )
        return node


def _load(text: str, source: str, limits: UserFlowSettings) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree (for line numbers), read within the limits."""
    limit = limits.max_document_bytes
    # characters <= bytes: a text with too many characters is too big without encoding it
    size = len(text) if len(text) > limit else len(text.encode())
    if size > limit:
        raise SpecificationError(
            source,
            [
                f"line 1, top: more than {limit:,} bytes ({_SETTING}MAX_DOCUMENT_BYTES); "
                "a specification is a few kilobytes"
            ],
        )
    loader = _BoundedLoader(text, limits)
    try:
        root = loader.get_single_node()
        if loader.problems:  # found in composing: build nothing from such a document
            raise SpecificationError(source, loader.problems)
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def _line_numbers(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Line of every mapping key and value in the YAML, by its path of keys."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)

    if root is not None:
        walk(root, ())
    return lines


def _range(value: dict[str, Any], limit: int) -> list[float]:
    """The values of ``{start, stop, step}``, counted by arithmetic before any is built: a
    tiny step is refused for its count, not by running out of memory."""
    start, stop, step = value["start"], value["stop"], value.get("step", 1)
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ValueError("start, stop and step must be finite numbers")
    if not step:
        raise ValueError("step must be non-zero and go from start towards stop")
    try:
        span = (stop - start) / step
    except OverflowError:  # integers so far apart that the count is not even a float
        span = math.inf
    if span < 0:
        raise ValueError("step must be non-zero and go from start towards stop")
    count = round(span) + 1 if math.isfinite(span) else math.inf
    if count > limit:
        shown = f"{count:,}" if math.isfinite(count) else "countless"
        raise ValueError(f"{shown} values: at most {limit:,} variants ({_SETTING}MAX_VARIANTS)")
    return [round(start + i * step, 10) for i in range(count)]


def check_specification(
    text: str, source: str = "specification", limits: UserFlowSettings | None = None
) -> FlowSpec:
    """Parse and check a specification; raise :class:`SpecificationError` listing every
    problem with its place (``line N, steps.center.inputs.plan``). ``limits`` default to
    the settings' ``user_flows``."""
    registered = all_steps()
    limits = limits or load_settings().user_flows
    try:
        data, root = _load(text, source, limits)
    except _Refused as exc:
        raise SpecificationError(source, [exc.problem]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise SpecificationError(source, [f"{where}: not valid YAML ({exc})"]) from None
    lines = _line_numbers(root)
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
        definition = registered.get(task) if isinstance(task, str) else None
        if definition is None:
            close = difflib.get_close_matches(str(task), registered, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listing = "`calypso flows tasks` lists them"
            problem((*here, "task"), f"unknown task {task!r}{hint}; {listing}")
            continue
        outputs[name] = definition.output
        techniques.add(definition.technique)
        sweep.update(_check_parameters(step.get("parameters"), definition, here, problem, limits))
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
        if not isinstance(step, dict) or step.get("task") not in registered:
            continue
        definition = registered[step["task"]]
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
    variants = math.prod(len(values) for values in sweep.values())  # counted, not built
    if variants > limits.max_variants:
        factors = " x ".join(f"{name} ({len(values)})" for name, values in sweep.items())
        step_name, parameter = next(iter(sweep)).split(".", 1)
        problem(
            ("steps", step_name, "parameters", parameter),
            f"the sweep makes {variants:,} variants ({factors}): at most "
            f"{limits.max_variants:,} ({_SETTING}MAX_VARIANTS)",
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


def _check_parameters(
    parameters: Any, definition, here, problem, limits: UserFlowSettings
) -> dict[str, list[Any]]:
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
        values = _sweep_values(value, model, name, limits.max_variants)
        if isinstance(values, str):
            problem(where, values)
        elif values is not None:
            sweep[f"{here[1]}.{name}"] = values
            single[name] = values[0]
            _validate_swept(model, name, values[1:], where, problem)
            continue
        else:
            single[name] = value
    _validate(model, single, (*here, "parameters"), problem)
    return sweep


def _sweep_values(value: Any, model, name: str, limit: int) -> list[Any] | str | None:
    """The values of a swept parameter, an error message, or None (not a sweep)."""
    if isinstance(value, dict) and {"start", "stop"} <= set(value):
        try:
            return _range(value, limit)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            return f"bad range {reprlib.repr(value)}: {exc}"  # shortened: 4000-digit stop
    if isinstance(value, list):
        try:  # a list the parameter itself takes (rows: [10, 13]) is not a sweep
            model(**{name: value})
            return None
        except ValidationError:
            pass
        if not value:
            return "an empty list sweeps nothing"
        if len(value) > limit:
            return f"a sweep of {len(value):,} values: at most {limit:,} ({_SETTING}MAX_VARIANTS)"
        return list(value)
    return None


def _validate_swept(model, name: str, values: list[Any], where, problem) -> None:
    """Every value of a sweep must be valid, not only the first: one problem says how many
    are not, and why the first of them is not (a line each buried the one that matters)."""
    refused: list[tuple[Any, str]] = []
    for value in values:
        try:
            model(**{name: value})
        except ValidationError as exc:
            refused.append((value, exc.errors()[0]["msg"]))
    if len(refused) == 1:
        problem(where, f"{refused[0][1]} (got {refused[0][0]!r})")
    elif refused:
        value, message = refused[0]
        problem(
            where,
            f"{len(refused):,} of the sweep's {len(values) + 1:,} values are refused, the "
            f"first {value!r}: {message}",
        )


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
    entry = TECHNIQUES[technique]
    data = yaml.safe_load(entry.specification.read_text())
    defaults = entry.parameters()().model_dump(mode="json", exclude_none=True)
    steps = all_steps()
    for step in data["steps"].values():
        if steps[step["task"]].takes_parameters:
            step["parameters"] = defaults | (step.get("parameters") or {})
    header = (
        f"# The built-in {technique} flow as a Calypso user flow. Edit the parameters (a list\n"
        "# or {start, stop, step} sweeps one), check it with `calypso flows check FILE`, keep\n"
        "# it with `calypso flows save FILE --name NAME`.\n"
    )
    data["description"] = f"built-in {technique} flow"
    return header + yaml.safe_dump(data, sort_keys=False)
