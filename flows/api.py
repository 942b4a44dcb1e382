"""Calypso's application API: run technique flows, saved user flows and exports from Python.

The ``calypso`` command line is a thin layer over these functions; tests, benchmarks and
notebooks call them directly. Nothing here prints: results come back as dictionaries
(the summaries ``calypso run --json`` shows) and every anticipated failure is a
:class:`~calypso.errors.CalypsoError` with a message meant for people. Only a progress bar
is drawn, on standard error, while a flow runs.

From a notebook::

    from calypso.flows.api import build_parameters, run_technique
    from calypso.flows.runtime import prepare_environment
    from calypso.settings import load_settings

    settings = load_settings(executor={"kind": "local", "n_workers": 4})
    prepare_environment(settings)  # quiet Prefect and Dask, as the CLI does
    parameters = build_parameters("diffraction", ["poni=/data/ceo2.poni", "npt=2000"])
    summary = run_technique(
        "diffraction", "/data/visitor/ma1234/id15/20240101/RAW_DATA/CeO2/CeO2_0001",
        parameters, scans=None, output=None, settings=settings,
    )
    summary["outputs"]  # the NeXus results, as file.h5::/entry paths
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import ParameterError
from calypso.flows.command_cluster import run_on_cluster
from calypso.flows.progress_bar import Progress, TerminalBar
from calypso.flows.techniques import TECHNIQUES

if TYPE_CHECKING:
    from pydantic import BaseModel

    from calypso.flows.prefect_api import ServerStart
    from calypso.flows.techniques import Technique
    from calypso.registry.access import Identity
    from calypso.registry.saved_flows import SavedFlow, SavedFlows
    from calypso.settings import CalypsoSettings

__all__ = [
    "build_parameters",
    "confine_run",
    "current_identity",
    "export_processed",
    "get_saved_flow",
    "parameter_model",
    "run_on_cluster",
    "run_saved_flow",
    "run_technique",
    "saved_flows",
]


def load_settings_with_workers(workers: int | None) -> CalypsoSettings:
    """The settings, on a local cluster of ``workers`` processes when the caller asked for one."""
    from calypso.settings import load_settings

    if workers:
        return load_settings(executor={"kind": "local", "n_workers": workers})
    return load_settings()


# -- parameters -------------------------------------------------------------


def parameter_model(technique: str) -> type[BaseModel]:
    """The pydantic model of a technique's parameters (``calypso parameters`` lists it)."""
    return TECHNIQUES[technique].parameters()


def _parse_value(text: str) -> Any:
    # `npt=2000` is a number and `unit=2th_deg` a string without the user quoting it.
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parameters(
    technique: str, assignments: list[str], params_file: str | None = None
) -> BaseModel:
    """The technique's parameter model from a file and ``NAME=VALUE`` assignments."""
    values = parameter_values(technique, assignments, params_file)
    return parameters_from(technique, values, f" in {params_file}" if params_file else "")


def parameter_values(
    technique: str, assignments: list[str], params_file: str | None = None
) -> dict[str, Any]:
    """The values a file and ``NAME=VALUE`` assignments give, not yet checked by the model
    (what ``calypso run`` sends to a running service, which checks them)."""
    values: dict[str, Any] = {}
    if params_file:
        values.update(_read_params_file(Path(params_file)))
        reader = TECHNIQUES[technique].parameter_file_reader()
        translated = reader(values, str(params_file)) if reader else None
        if translated is not None:  # another program's file (pyFAI's configuration)
            values = translated
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--set {assignment!r}: expected NAME=VALUE, e.g. --set npt=2000")
        values[name.strip()] = _parse_value(text.strip())
    return values


def parameters_from(technique: str, values: dict[str, Any], source: str) -> BaseModel:
    """The technique's parameter model from ``values``; unknown names and bad values are
    one :class:`ParameterError` naming all of them (``source`` says where they came from)."""
    from pydantic import ValidationError

    model = parameter_model(technique)
    if unknown := unknown_parameters(technique, values):
        raise ParameterError(unknown)
    try:
        return model(**values)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ParameterError(f"invalid {technique} parameters{source}: {problems}") from None


def unknown_parameters(technique: str, names: Iterable[str]) -> str | None:
    """What is wrong with the names among ``names`` that are no parameter of ``technique``
    (each with the closest one), or None."""
    known = parameter_model(technique).model_fields
    unknown = [name for name in names if name not in known]
    if not unknown:
        return None
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"unknown {technique} parameter {', '.join(hints)}; known parameters: "
        f"{', '.join(known)} (`calypso parameters {technique}` explains them)"
    )


def _problem(error: Any) -> str:
    """One of pydantic's errors as a user reads it: the parameter, what is wrong, the value
    given; a rule between parameters (no single one to name) by its own words."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message
    return f"{'.'.join(str(p) for p in error['loc'])}: {message} (got {error.get('input')!r})"


def _read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParameterError(f"parameter file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        # YAML's message spans lines (the line quoted, a caret): its place and problem.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ParameterError(f"parameter file {path} cannot be parsed{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"parameter file {path} must hold a mapping of NAME: VALUE")
    return data


# -- who acts, and what they may touch ---------------------------------------------


def current_identity(settings: CalypsoSettings) -> Identity:
    """Who acts: the identity the caller set (:func:`calypso.registry.access.acting_as`:
    the portal's signed-in user, a test's), else this process's Unix account."""
    from calypso.registry.access import current_identity as identity

    return identity(settings)


def geometry_files(values: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(field, "file", name)`` of the files a diffraction geometry's detector names (a
    NexusDetector's file, a spline): confinement checks them with the path parameters."""
    from calypso.tasks.raw.pyfai_config import detector_files

    geometry = values.get("geometry")
    config = geometry.get("detector_config") if isinstance(geometry, dict) else None
    return [
        (f"geometry.detector_config.{key}", "file", name) for key, name in detector_files(config)
    ]


def confine_run(
    technique: str,
    input_path: str,
    parameters: BaseModel,
    output: str | None,
    settings: CalypsoSettings,
    identity: Identity,
    export_to: str | None = None,
) -> None:
    """The one confinement check for a run of a technique's flow (raises
    :class:`~calypso.registry.access.AccessError`; nothing is read or written before)."""
    from calypso.registry.access import Intent, confine
    from calypso.techniques.fields import path_values

    values = parameters.model_dump()
    marked = path_values(type(parameters), values) + geometry_files(values)
    intent = Intent(
        f"{technique} run",
        raw=input_path,
        output=output,
        parameters=[(f"parameters.{name}", kind, value) for name, kind, value in marked],
        export_to=export_to,
    )
    confine(identity, intent, settings)


# -- technique flows ----------------------------------------------------------


def run_technique(
    technique: str,
    input_path: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output: str | None,
    settings: CalypsoSettings,
    export_to: str | None = None,
    identity: Identity | None = None,
    progress: Progress | None = None,
    api: ServerStart | None = None,
) -> dict[str, Any]:
    """Check the input (inside the proposals of ``identity``, default the caller's:
    :func:`current_identity`), then run the technique's flow on the configured Dask
    cluster, reporting to ``progress`` (default: a bar on the terminal). ``api``: the
    Prefect server the caller began (:func:`calypso.flows.prefect_api.begin_prefect_api`),
    else one is begun here."""
    began = time.perf_counter()
    identity = identity or current_identity(settings)
    confine_run(technique, input_path, parameters, output, settings, identity, export_to)
    entry = TECHNIQUES[technique]
    # Shown from the first second: what is happening before the first frame is counted.
    stage = f"reading {Path(input_path).name}"
    bar = progress or TerminalBar(0, entry.unit, stage=stage)
    bar.stage(stage)
    try:
        return _run_technique(
            entry, bar, began, input_path, parameters, scans, output, settings, export_to, api
        )
    finally:
        if progress is None:  # the caller closes its own
            bar.close()


def _run_technique(
    entry: Technique,
    bar: Progress,
    began: float,
    input_path: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output: str | None,
    settings: CalypsoSettings,
    export_to: str | None,
    api: ServerStart | None,
) -> dict[str, Any]:
    from calypso.flows.prefect_api import begin_prefect_api

    with ExitStack() as stack:
        # Prefect's server (a process of its own) starts while Prefect and Dask are
        # imported and the plan is made below, and is stopped if the input is refused.
        if api is None:
            api = stack.enter_context(begin_prefect_api(settings))
        from calypso.executors import local_worker_count
        from calypso.flows.engine import plan_in_proposal, remember_plan, with_task_runner

        if not settings.executor.preload:
            # Workers import this technique's code while they start, not another's.
            executor = settings.executor.model_copy(update={"preload": [entry.preload]})
            settings = settings.model_copy(update={"executor": executor})
        # Check everything before the run: bad input fails in a second, with one message
        # and nothing written. The run takes this plan.
        workers = local_worker_count(settings.executor)
        plan = plan_in_proposal(
            entry.name, input_path, parameters, scans, output, settings, workers
        )
        remember_plan(entry.name, input_path, parameters, scans, output, workers, plan)
        total = getattr(plan, entry.count_attribute)
        bar.update_to(0, total)
        technique_flow = entry.flow()
        if export_to:
            from calypso.tasks.export import check_target_uri

            check_target_uri(export_to)
        summary = run_on_cluster(
            settings,
            total,
            entry.unit,
            lambda runner: with_task_runner(technique_flow, runner)(
                raw=input_path,
                parameters=parameters,
                scans=scans,
                output_dir=output,
                export_to=export_to,
            ),
            bar,
            in_process=bool(getattr(plan, "in_process", False)),
            api=api,
            threaded=entry.threaded_chunks,
            head_start=lambda: entry.head_start(plan),
            meanwhile=lambda: _import_what_the_run_imports(entry, api),
        )
    summary["wall_s"] = round(time.perf_counter() - began, 3)
    return summary


def _import_what_the_run_imports(entry: Technique, api: ServerStart | None) -> None:
    """What the run will import (Prefect's engine, the technique's modules, matplotlib:
    ~1 s), imported while this command's server starts and no longer once it answers:
    the run then starts at once and imports the rest as it needs it (a cold 60-frame
    command had its server ready and unused for 1.66 s of its 7.0 s, session 40). The
    technique's modules are its roots, which import theirs (listing every module a run
    may import, ``Technique.modules``, reads 78 files: 0.2-0.46 s)."""
    from calypso.flows.online.warm_starts import ALWAYS, import_modules

    first = [m for m in ALWAYS if not m.startswith("matplotlib")]
    modules = [*first, *sorted(entry.roots()), *(m for m in ALWAYS if m not in first)]
    import_modules(modules, until=api.answering if api is not None else None)


# -- exports --------------------------------------------------------------------


def export_processed(
    source: str,
    settings: CalypsoSettings,
    target: str | None = None,
    include: list[str] | None = None,
    verify: bool = False,
    identity: Identity | None = None,
) -> dict[str, Any]:
    """Copy a processed dataset (a folder or its catalogue id) to ``target``, resumably, and
    record the export in the catalogue. ``target`` defaults to the settings' export target
    plus the folder's name; ``include`` keeps only files matching these shell patterns;
    ``verify`` reads every object back and checks its SHA-256. The folder must be in a
    proposal of ``identity`` (default: the caller's)."""
    from calypso.registry.access import Intent, confine
    from calypso.tasks.export import (
        dataset_to_export,
        default_export_uri,
        export_dataset,
        export_summary,
        record_export,
    )

    folder, record = dataset_to_export(source, settings)
    record_id = record.id if record else None
    target = target or default_export_uri(settings.export_target, folder, record)
    intent = Intent("export", export_source=str(folder), export_to=target)
    confine(identity or current_identity(settings), intent, settings)
    bar = TerminalBar(0, "B", scale=True)
    try:
        report = export_dataset(
            folder, target, settings, include, verify, progress=bar.update_to, record=record
        )
    finally:
        bar.close()
    summary = export_summary(report, record_export(report, record_id, settings))
    return summary | {"source": str(folder), "catalogue_id": record_id}


# -- saved user flows -------------------------------------------------------------


def saved_flows(settings: CalypsoSettings) -> SavedFlows:
    """The registry of saved user flows (beside the catalogue)."""
    from calypso.registry.saved_flows import SavedFlows

    return SavedFlows(settings.catalogue_path)


def get_saved_flow(reference: str, settings: CalypsoSettings) -> SavedFlow:
    """A saved flow by ``NAME`` (its latest version) or ``NAME@VERSION``."""
    from calypso.registry.saved_flows import parse_reference

    return saved_flows(settings).get(*parse_reference(reference))


def run_saved_flow(
    flow: SavedFlow,
    input_path: str,
    scans: list[int] | None,
    output: str | None,
    settings: CalypsoSettings,
    identity: Identity | None = None,
) -> dict[str, Any]:
    """Check a saved flow and its paths (confined to its dataset's proposal, the flow's
    own and one of ``identity``'s, default the caller's), then run every variant of it on
    the configured Dask cluster."""
    began = time.perf_counter()
    from calypso.flows.engine import with_task_runner
    from calypso.flows.specification import check_specification
    from calypso.flows.user_flows import confine_saved_flow, default_output, user_flow

    spec = check_specification(flow.checked().specification, flow.label)
    raw = str(Path(input_path).absolute())
    identity = identity or current_identity(settings)
    confine_saved_flow(identity, flow, spec, raw, output, settings)
    output_dir = output or default_output(raw, spec.technique, flow.name, flow.version)
    # Workers import the code of the flow's technique while they start.
    modules = [TECHNIQUES[spec.technique].preload]
    settings = settings.model_copy(
        update={"executor": settings.executor.model_copy(update={"preload": modules})}
    )
    result = run_on_cluster(
        settings,
        len(spec.variants()),
        "variants",
        lambda runner: with_task_runner(user_flow, runner)(
            name=flow.name,
            version=flow.version,
            specification=flow.specification,
            raw=raw,
            scans=scans,
            output_dir=output_dir,
            sha256=flow.sha256,
        ),
        threaded=TECHNIQUES[spec.technique].threaded_chunks,
    )
    result["wall_s"] = round(time.perf_counter() - began, 3)
    return result
