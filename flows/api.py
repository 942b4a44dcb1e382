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
from collections.abc import Callable
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import ParameterError
from calypso.flows.progress_bar import Progress, TerminalBar
from calypso.flows.startup import collect_from_now_on
from calypso.flows.techniques import TECHNIQUES

if TYPE_CHECKING:
    from concurrent.futures import Future

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
    unknown = [name for name in values if name not in model.model_fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, model.model_fields, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"unknown {technique} parameter {', '.join(hints)}; known parameters: "
            f"{', '.join(model.model_fields)} (`calypso parameters {technique}` explains them)"
        )
    try:
        return model(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ParameterError(f"invalid {technique} parameters{source}: {problems}") from None


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
        raise ParameterError(f"parameter file {path} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"parameter file {path} must hold a mapping of NAME: VALUE")
    return data


# -- who acts, and what they may touch ---------------------------------------------


def current_identity(settings: CalypsoSettings) -> Identity:
    """Who acts: the identity the caller set (:func:`calypso.registry.access.acting_as`:
    the portal's signed-in user, a test's), else this process's Unix account."""
    from calypso.registry.access import current_identity as identity

    return identity(settings)


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

    marked = path_values(type(parameters), parameters.model_dump())
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
        from calypso.flows.engine import remember_plan, with_task_runner

        if not settings.executor.preload:
            # Workers import this technique's code while they start, not another's.
            executor = settings.executor.model_copy(update={"preload": [entry.preload]})
            settings = settings.model_copy(update={"executor": executor})
        # Check everything before the run: bad input fails in a second, with one message
        # and nothing written. The run takes this plan.
        workers = local_worker_count(settings.executor)
        plan = entry.plan()(input_path, parameters, scans, output, settings, workers)
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
            meanwhile=lambda: _import_what_the_run_imports(entry),
        )
    summary["wall_s"] = round(time.perf_counter() - began, 3)
    return summary


def _import_what_the_run_imports(entry: Technique) -> None:
    """What the run will import (Prefect's engine, the writers, matplotlib: ~1 s), imported
    while this command's server starts rather than once it answers."""
    from calypso.flows.online.warm_starts import import_modules, preloaded_modules

    import_modules(preloaded_modules([entry]))


def run_on_cluster(
    settings: CalypsoSettings,
    total: int,
    unit: str,
    call: Callable[[Any], Any],
    bar: Progress | None = None,
    in_process: bool = False,
    api: ServerStart | None = None,
    threaded: bool = False,
    head_start: Callable[[], Any] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Any:
    """``call(task_runner)`` with a Prefect API up (the one ``api`` began, else the
    configured one or one started now), on the Dask cluster the settings name (a local
    one boots while Prefect starts), a progress bar counting ``unit`` (``bar``, or a new
    one) that says what is starting until the first result. ``in_process``: the plan's
    work is too small for a cluster; its tasks run in this process's threads.
    ``threaded``: a cluster of this command's own is one worker of threads in this
    process (the technique's ``threaded_chunks``); a kept cluster is not. While the Prefect
    server this command began starts, ``head_start()`` (a context manager, or None) begins
    the run's chunks in a thread when they are to run in this process's threads
    (:mod:`calypso.tasks.head_start`), and ``meanwhile()`` runs."""
    import os

    from calypso.executors import boot_local_cluster, build_task_runner
    from calypso.executors.dask import (
        boot_kept_cluster,
        in_threads,
        keeps_cluster,
        kept_task_runner,
    )
    from calypso.flows.prefect_api import prefect_api
    from calypso.flows.runtime import check_prefect_api, prefect_api_secret
    from calypso.flows.techniques import preloading_every_technique
    from calypso.tasks.progress import listening

    with ExitStack() as stack:
        if bar is None:
            bar = stack.enter_context(closing(TerminalBar(total, unit)))
        check_prefect_api()
        kept = not in_process and keeps_cluster(
            settings.executor,
            bool(os.environ.get("PREFECT_API_URL")) or settings.server.local_keep_s > 0,
        )
        # One kept cluster for every technique: its workers import them all.
        every = preloading_every_technique(settings) if kept else settings
        # Chunks that can run in this command's threads do so (with the head start while
        # Prefect's server starts) unless the kept cluster runs already, started by a
        # command whose chunks need worker processes. Started for them, its workers'
        # imports took the cores of the run (a new home's first 600-frame command: 14.4-18.1
        # s against 10.7-12.2 s in its threads); started after it, those of the next
        # command (14.1-19.9 s against 9.6-12.8 s). Warm, it takes a later command's
        # chunks ~3% sooner than its threads do (medians 10.27 s against 10.55 s).
        if kept and in_threads(settings.executor, threaded):
            kept = _kept_runs(every, api)
        booting = None if in_process or kept else boot_local_cluster(settings.executor, threaded)
        if kept:
            settings = every
        kept_booting: list[Future] = []

        def boot_kept(api_url: str) -> None:  # as soon as the Prefect API's address is known
            secret = prefect_api_secret(settings)
            kept_booting.append(
                boot_kept_cluster(settings.executor, settings.home, api_url, secret)
            )

        if kept and os.environ.get("PREFECT_API_URL"):
            boot_kept(os.environ["PREFECT_API_URL"])
        if booting is not None:  # closed even if the Prefect API never comes up
            stack.callback(_close_cluster, booting)
        starting = api is not None and api.pending()
        own_threads = booting is not None and in_threads(settings.executor, threaded)
        if starting and own_threads and head_start is not None:
            begun = head_start()  # the chunk tasks run in this process: they can take them
            if begun is not None:
                stack.enter_context(begun)
        if starting and meanwhile is not None:
            meanwhile()
        if os.environ.get("PREFECT_API_URL"):
            stage = "connecting to Prefect"
        elif settings.server.local_keep_s == 0:
            stage = "starting a temporary Prefect server"
        else:
            stage = "finding or starting the local Prefect server"
        bar.stage(stage + (" and Dask workers" if booting is not None else ""))
        api_url = stack.enter_context(prefect_api(settings, boot_kept if kept else None, api))
        if booting is not None:  # ... and normally before the API goes: workers flush logs to it
            stack.callback(_close_cluster, booting)
            bar.stage("starting Dask workers")
        stack.enter_context(listening(bar.update_to))
        if in_process:
            from prefect.task_runners import ThreadPoolTaskRunner

            runner = ThreadPoolTaskRunner(max_workers=1)
        elif kept:
            bar.stage("finding or starting the local Dask cluster")
            if not kept_booting:  # the local server was found running
                boot_kept(api_url)
            runner, release = kept_task_runner(settings.executor, settings.home, kept_booting[0])
            stack.callback(release)
        else:
            runner = build_task_runner(settings.executor, booting.result() if booting else None)
        bar.stage("running", started=True)
        collect_from_now_on()  # the command's start-up is done: :mod:`calypso.flows.startup`
        return call(runner)


def _kept_runs(settings: CalypsoSettings, api: ServerStart | None) -> bool:
    """Whether the kept local cluster for ``settings`` runs, for the Prefect API that
    ``PREFECT_API_URL`` names or ``api`` found running (one this command is starting has
    no cluster yet)."""
    import os

    from calypso.executors.dask import kept_cluster_runs

    url = os.environ.get("PREFECT_API_URL")
    if not url and api is not None and not api.pending():
        url = api.url
    return bool(url) and kept_cluster_runs(settings.executor, settings.home, url)


def _close_cluster(booting: Future) -> None:
    booting.result().close()  # closing twice is harmless


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
        export_dataset,
        export_summary,
        record_export,
    )

    folder, record_id = dataset_to_export(source, settings)
    target = target or f"{settings.export_target.rstrip('/')}/{folder.name}"
    intent = Intent("export", export_source=str(folder), export_to=target)
    confine(identity or current_identity(settings), intent, settings)
    bar = TerminalBar(0, "B", scale=True)
    try:
        report = export_dataset(folder, target, settings, include, verify, progress=bar.update_to)
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
