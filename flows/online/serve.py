"""``calypso serve``: one Prefect deployment per technique, started by acquisition events.

Each deployment shows its flow's parameters (the technique's pydantic model) as
the form of the Prefect UI, runs at most ``serve.concurrency`` flow runs at once,
and has a trigger: every ``calypso.acquisition.completed`` event whose resource
names its technique starts a run with the event's dataset, scans and parameters.

Each saved user flow has a deployment of its own too (flow ``saved-flow``,
deployment named after the saved flow, triggered by events of watch rules
``technique = "flow:NAME"``), kept up to date while serving: a flow saved later
appears within ``serve.saved_flow_poll_s``. The ``saved-flow/saved-flow``
deployment runs any saved flow by name.

A technique fed live (diffraction, MX) has a second deployment, ``<technique>-live``,
triggered by ``calypso.acquisition.started``: a live run that follows the scan from its
start (:mod:`calypso.flows.online.live_served`; ``calypso watch --blissdata`` posts the
event).

The flow runs share one Dask cluster that ``calypso serve`` keeps for its
lifetime (a local one by default), instead of starting one per run. Pending ICAT
registrations are retried periodically.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from contextlib import suppress
from typing import Any

import calypso
from calypso.errors import ConfigurationError
from calypso.executors.interrupts import StopRequest, ctrl_c_left_to_this_process
from calypso.flows.dead_runs import reap_now_and_then
from calypso.flows.online.acquisitions import EVENT, LIVE_EVENT, live_deployment
from calypso.flows.online.live_base import LIVE_TECHNIQUES
from calypso.flows.online.submissions import stop_serving
from calypso.flows.online.warm_starts import preloaded_modules, start_warm
from calypso.flows.techniques import TECHNIQUES, Technique
from calypso.registry.saved_flows import ANY_SAVED_FLOW, SavedFlow, SavedFlows
from calypso.settings import CalypsoSettings

logger = logging.getLogger("calypso.serve")

SAVED_FLOW_CONCURRENCY = 2  # flow runs at once of the saved flows, unless the settings say


class Served:
    """A flow ``calypso serve`` runs, and its deployment's options (name, trigger, limit,
    tags...): the runner holds the flow itself, so its runs start warm
    (:mod:`calypso.flows.online.warm_starts`) instead of importing it again."""

    def __init__(self, flow, **options: Any) -> None:
        self.flow = flow
        self.options = options

    @property
    def label(self) -> str:
        return f"{self.flow.name}/{self.options['name']}"

    @property
    def concurrency_limit(self) -> int:
        return self.options.get("concurrency_limit") or 1

    async def add_to(self, runner) -> Any:
        return await runner.aadd_flow(self.flow, **self.options)


def _from_event(field: str) -> dict[str, Any]:
    """A deployment parameter filled from the triggering event's payload (JSON kept)."""
    return {
        "__prefect_kind": "json",
        "value": {
            "__prefect_kind": "jinja",
            "template": f"{{{{ event.payload.{field} | tojson }}}}",
        },
    }


def technique_deployment(technique: Technique, settings: CalypsoSettings):
    """The deployment of one technique flow, with its acquisition trigger."""
    return _technique_served(
        technique,
        settings,
        technique.flow(),
        name=technique.name,
        event=EVENT,
        trigger_name=f"{technique.name} after each acquisition",
        description=f"{technique.description} Runs after each acquisition event ({EVENT}) "
        f"for {technique.name}, or by hand from this form.",
    )


def technique_live_deployment(technique: Technique, settings: CalypsoSettings):
    """The deployment of a technique's live flow, started by a scan's start event: its
    run follows the scan the event names (``source``, ``scan_key``) and claims the key
    the scan's completed event has."""
    from calypso.flows.techniques import load

    return _technique_served(
        technique,
        settings,
        load(f"calypso.flows.online.live_served:{technique.name}_live"),
        name=live_deployment(technique.name),
        event=LIVE_EVENT,
        trigger_name=f"{technique.name} live from each scan's start",
        description=f"{technique.description} Live: runs at each scan's start ({LIVE_EVENT}) "
        f"for {technique.name}, follows the scan as it is written and gives the offline result.",
        live=True,
    )


def _technique_served(
    technique: Technique,
    settings: CalypsoSettings,
    flow: Any,
    *,
    name: str,
    event: str,
    trigger_name: str,
    description: str,
    live: bool = False,
) -> Served:
    """A technique's flow served with the trigger of its ``event`` (the event's payload
    gives the run's parameters; a live run's also the scan it follows) and the
    technique's concurrency limit."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    parameters = {field: _from_event(field) for field in ("raw", "scans", "parameters")}
    parameters["trigger"] = _from_event("key")
    if live:
        parameters |= {field: _from_event(field) for field in ("source", "scan_key")}
    trigger = DeploymentEventTrigger(
        name=trigger_name,
        expect={event},
        match={"calypso.technique": technique.name},
        parameters=parameters,
    )
    limit = settings.serve.concurrency.get(
        technique.name, settings.serve.default_concurrency or technique.concurrency
    )
    return Served(
        flow,
        name=name,
        triggers=[trigger],
        concurrency_limit=limit,
        version=technique.version,
        tags=["calypso", technique.name, *(["live"] if live else [])],
        description=description,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def saved_flow_deployment(settings: CalypsoSettings, saved: SavedFlow | None = None):
    """The deployment of one saved user flow, named after it and triggered by acquisitions
    of rules ``technique = "flow:NAME"``; without ``saved``, the ``saved-flow`` deployment
    whose form takes any saved flow's name (no trigger: each flow has its own)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from calypso.flows.user_flows import saved_flow

    if saved is None:
        return Served(
            saved_flow,
            name=ANY_SAVED_FLOW,
            concurrency_limit=settings.serve.default_concurrency or SAVED_FLOW_CONCURRENCY,
            tags=["calypso", "user-flow"],
            description="Run any saved Calypso user flow (`calypso flows list`) on a raw "
            "dataset, by name.",
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    trigger = DeploymentEventTrigger(
        name=f"{saved.name} after each acquisition",
        expect={EVENT},
        match={"calypso.technique": "saved-flow", "calypso.flow": saved.name},
        parameters={
            "name": saved.name,
            "raw": _from_event("raw"),
            "scans": _from_event("scans"),
            "trigger": _from_event("key"),
        },
    )
    return Served(
        saved_flow,
        name=saved.name,
        triggers=[trigger],
        parameters={"name": saved.name},
        concurrency_limit=settings.serve.default_concurrency or SAVED_FLOW_CONCURRENCY,
        paused=False,
        version=f"{saved.label} (calypso {calypso.__version__})",
        tags=["calypso", "user-flow", saved.technique],
        description=f"Saved user flow {saved.name} ({saved.technique}, owner {saved.owner}, "
        f"proposal {saved.proposal}): latest version unless the form names one. "
        f"{saved.description}".strip(),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


async def follow_saved_flows(runner, settings: CalypsoSettings, served: dict[str, str]) -> None:
    """Keep one deployment per saved flow while serving: a flow saved (or given a new
    version) gets its deployment within ``serve.saved_flow_poll_s``; a deleted flow's
    deployment is paused, so its trigger no longer fires."""
    import anyio
    from prefect.client.orchestration import get_client

    registry = SavedFlows(settings.catalogue_path)
    said = ""
    while True:
        await anyio.sleep(settings.serve.saved_flow_poll_s)
        try:
            latest = {flow.name: flow for flow in registry.list()}  # versions ascending
            for name, flow in latest.items():
                if served.get(name) != flow.label:
                    await saved_flow_deployment(settings, flow).add_to(runner)
                    served[name] = flow.label
                    logger.info("serving saved flow %s", flow.label)
            for name in [name for name in served if name not in latest]:
                async with get_client() as client:
                    deployment = await client.read_deployment_by_name(f"saved-flow/{name}")
                    await client.pause_deployment(deployment.id)
                del served[name]
                logger.info("saved flow %s deleted: its deployment is paused", name)
        except Exception as exc:  # keep serving; say why (once, not every poll)
            if str(exc) != said:
                logger.warning("cannot update the saved flows' deployments: %s", exc)
            said = str(exc)
        else:
            said = ""


def start_shared_cluster(settings: CalypsoSettings):
    """A local cluster for every flow run served (None when the settings name a scheduler);
    flow runs, which are child processes, find it through CALYPSO_EXECUTOR__*."""
    from calypso.executors.dask import local_cluster_options, start_local_cluster

    if settings.executor.kind != "local":
        return None
    executor = settings.executor.model_copy(
        update={"preload": [technique.preload for technique in TECHNIQUES.values()]}
    )
    cluster = start_local_cluster(**local_cluster_options(executor))
    os.environ["CALYPSO_EXECUTOR__KIND"] = "address"
    os.environ["CALYPSO_EXECUTOR__ADDRESS"] = cluster.scheduler_address
    return cluster


def start_submissions(settings: CalypsoSettings, cluster, techniques) -> Any:
    """Take runs that commands submit (:mod:`calypso.flows.online.submissions`) on the
    shared cluster, with the techniques' code imported now rather than by the first run:
    their flows and planners at once, what else a run imports (its writers, the quick
    look's matplotlib: ~0.3 CPU-s, 0.2 s more of the first diffraction quick look) in the
    background. Submitted runs run in this process, not in the fork server's children."""
    from calypso.flows.online.submissions import serve_submissions
    from calypso.flows.online.warm_starts import import_modules

    for technique in techniques:
        technique.flow()
        technique.plan()
    modules = preloaded_modules(techniques)
    threading.Thread(target=import_modules, args=(modules,), daemon=True).start()
    if cluster is not None:
        executor = {"kind": "address", "address": cluster.scheduler_address}
        settings = settings.model_copy(
            update={"executor": settings.executor.model_copy(update=executor)}
        )
    return serve_submissions(settings)


def start_icat_flushing(settings: CalypsoSettings, stop: threading.Event) -> None:
    """Retry pending ICAT registrations every ``serve.icat_flush_interval_s``."""
    if settings.catalogue.backend != "icat":
        return
    from calypso.registry import open_catalogue

    def flush_now_and_then() -> None:
        while not stop.wait(settings.serve.icat_flush_interval_s):
            try:
                report = open_catalogue(settings).flush(release_stale=True)
            except Exception as exc:  # keep serving; say why
                logger.warning("ICAT flush failed: %s", exc)
                continue
            if report.delivered or report.error:
                logger.info(
                    "ICAT flush: %d delivered, %d pending%s",
                    len(report.delivered),
                    len(report.pending),
                    f" ({report.error})" if report.error else "",
                )

    threading.Thread(target=flush_now_and_then, name="icat-flush", daemon=True).start()


def serve(settings: CalypsoSettings, techniques: list[str] | None = None) -> None:
    """Serve the deployments until interrupted (Ctrl-C or SIGTERM)."""
    with StopRequest() as stop:  # executors/interrupts.py
        try:
            _start_and_serve(settings, techniques, stop)
        except KeyboardInterrupt:
            logger.info("interrupted: serve stops (its deployments stay, for the next serve)")


def _start_and_serve(
    settings: CalypsoSettings, techniques: list[str] | None, stop: StopRequest
) -> None:
    from calypso.flows.runtime import check_prefect_api
    from calypso.registry.access import require_data_roots

    require_data_roots(settings, "calypso serve")  # fail closed (issue #20)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigurationError(
            "calypso serve needs a Prefect server: start one (`calypso server`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or CALYPSO_PREFECT_API_URL)"
        )
    check_prefect_api()
    chosen = [TECHNIQUES[name] for name in techniques] if techniques else TECHNIQUES.values()
    live = [technique for technique in chosen if technique.name in LIVE_TECHNIQUES]
    warm: list[str] = []
    if settings.serve.warm_starts:
        from calypso.flows.online.live_served import live_modules

        # Found before any thread of the service parses Python too (CPython 3.11's
        # ast.parse in two threads at once: "AST constructor recursion depth mismatch").
        warm = preloaded_modules(chosen) + live_modules([t.name for t in live])
    cluster = submissions = None
    stopping = threading.Event()
    try:
        # A stop asked meanwhile is taken between the steps, each left whole.
        with ctrl_c_left_to_this_process():  # executors/interrupts.py
            stop.check()
            cluster = start_shared_cluster(settings)
            start_icat_flushing(settings, stopping)
            reap_now_and_then(settings, stopping)  # runs that died without a word: Crashed
            stop.check()
            submissions = start_submissions(settings, cluster, chosen)
            if warm:
                start_warm(warm)
        stop.check()
        deployments = [technique_deployment(technique, settings) for technique in chosen]
        deployments += [technique_live_deployment(technique, settings) for technique in live]
        deployments.append(saved_flow_deployment(settings))
        saved = {flow.name: flow for flow in SavedFlows(settings.catalogue_path).list()}
        deployments += [saved_flow_deployment(settings, flow) for flow in saved.values()]
        served = {name: flow.label for name, flow in saved.items()}
        # All saved flows share the slots of one deployment: saving flows adds no load.
        limit = sum(d.concurrency_limit or 1 for d in deployments[: len(chosen) + len(live) + 1])
        stop.check()
        asyncio.run(_serve(deployments, settings, served, limit, stop))
        stop.check()
    finally:
        stopping.set()
        stop_serving(submissions, settings)
        if cluster is not None:
            cluster.close()


async def _serve(
    deployments: list, settings: CalypsoSettings, served: dict, limit: int, stop: StopRequest
) -> None:
    from prefect.runner import Runner

    # Deployments stay active when serve stops: runs triggered meanwhile wait for it.
    runner = Runner(
        name="calypso", pause_on_shutdown=False, limit=limit, query_seconds=settings.serve.poll_s
    )
    for deployment in deployments:
        await deployment.add_to(runner)
        stop.check()
    from calypso.registry.access.landlock import describe

    names = ", ".join(deployment.label for deployment in deployments)
    print(f"calypso serve: serving {names}; Ctrl-C stops", flush=True)
    print(f"calypso serve: {describe()}", flush=True)
    following = asyncio.create_task(follow_saved_flows(runner, settings, served))
    prompted = asyncio.create_task(start_runs_once_scheduled(runner))
    # SIGTERM too is this command's (StopRequest): the runner's own handler would exit
    # from wherever the main thread is, before it has started.
    runner.handle_sigterm = lambda *_: None
    asked = asyncio.Event()
    try:
        with stop.in_loop(asyncio.get_running_loop(), asked.set):
            running = asyncio.create_task(runner.start())
            waiting = asyncio.create_task(asked.wait())
            await asyncio.wait([running, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if asked.is_set():
                await _stop_runner(runner, running, ctrl_c=stop.signal == signal.SIGINT)
            with suppress(asyncio.CancelledError):  # stopped by _stop_runner
                await running
    finally:
        following.cancel()
        prompted.cancel()


# How long a runner whose task a Ctrl-C cancelled has to end (its runs, which took the
# Ctrl-C too, record themselves interrupted meanwhile) before its own stop is called.
CTRL_C_GRACE_S = 30.0


async def _stop_runner(runner, running: asyncio.Task, ctrl_c: bool) -> None:
    """Stop ``runner`` once it has started: cancelled as it started, it absorbed the
    cancellation now and then and served on. On Ctrl-C its task is cancelled, as asyncio
    does, and the runs, which took the Ctrl-C too, record themselves interrupted (its own
    stop cancels them first: "Cancelled", their records left "running"). On SIGTERM, or
    if it has not ended after CTRL_C_GRACE_S: its own stop ("Runner is shutting down";
    their records are released once their lease runs out)."""
    while not runner.started and not running.done():
        await asyncio.sleep(0.05)
    if ctrl_c and not running.done():
        running.cancel()
        await asyncio.wait([running], timeout=CTRL_C_GRACE_S)
    if runner.started and not running.done():
        await runner.astop()


# The names of the events of a flow run put in a Scheduled-type state (Prefect names them
# after the state: a new run, a run to be retried).
SCHEDULED_EVENTS = ["prefect.flow-run.Scheduled", "prefect.flow-run.AwaitingRetry"]
STREAM_RETRY_S = 10.0  # after the server's event stream failed: the polls go on meanwhile


async def start_runs_once_scheduled(runner) -> None:
    """Look for flow runs to start as soon as the Prefect server says that one was
    scheduled, not only at the runner's next poll (every ``serve.poll_s``; half of it on
    average): a triggered or launched run starts that much sooner. The server's event
    stream says it; a burst of runs is looked for once; the runner's own bookkeeping
    (runs being submitted, its limit) makes a run found twice start once. Without the
    stream (a server that refuses it, a proxy without websockets), the polls alone."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    look = getattr(runner, "_get_and_submit_flow_runs", None)
    if look is None:  # another Prefect: its polls alone
        logger.info("runs start at serve's polls: this Prefect's runner has no look-up to call")
        return
    scheduled = asyncio.Event()

    async def look_when_told() -> None:
        while True:
            await scheduled.wait()
            scheduled.clear()  # what is scheduled from now on prompts another look
            if runner.started and not runner.stopping:
                try:
                    await look()
                except Exception as exc:  # the next poll tries again
                    logger.debug("looking for scheduled runs: %s", exc)

    looking = asyncio.create_task(look_when_told())
    said = ""
    try:
        while True:
            try:
                names = EventFilter(event=EventNameFilter(name=SCHEDULED_EVENTS))
                async with get_events_subscriber(filter=names) as events:
                    said = ""
                    async for _ in events:
                        scheduled.set()
            except Exception as exc:  # say why once, not at every retry
                if str(exc) != said:
                    logger.warning(
                        "runs start at serve's polls: the Prefect server's event stream "
                        "is not available (%s)",
                        exc,
                    )
                said = str(exc)
            await asyncio.sleep(STREAM_RETRY_S)
    finally:
        looking.cancel()
