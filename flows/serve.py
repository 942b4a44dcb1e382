"""``calypso serve``: one Prefect deployment per technique, started by acquisition events.

Each deployment shows its flow's parameters (the technique's pydantic model) as
the form of the Prefect UI, runs at most ``serve.concurrency`` flow runs at once,
and has a trigger: every ``calypso.acquisition.completed`` event whose resource
names its technique starts a run with the event's dataset, scans and parameters.

The flow runs share one Dask cluster that ``calypso serve`` keeps for its
lifetime (a local one by default), instead of starting one per run. Pending ICAT
registrations are retried periodically.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from calypso.errors import ConfigurationError
from calypso.flows.techniques import TECHNIQUES, Technique
from calypso.settings import CalypsoSettings
from calypso.tasks.acquisitions import EVENT

logger = logging.getLogger("calypso.serve")


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
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    trigger = DeploymentEventTrigger(
        name=f"{technique.name} after each acquisition",
        expect={EVENT},
        match={"calypso.technique": technique.name},
        parameters={
            "raw": _from_event("raw"),
            "scans": _from_event("scans"),
            "parameters": _from_event("parameters"),
            "trigger": _from_event("key"),
        },
    )
    limit = settings.serve.concurrency.get(technique.name, settings.serve.default_concurrency)
    return technique.flow().to_deployment(
        name=technique.name,
        triggers=[trigger],
        concurrency_limit=limit,
        version=technique.version,
        tags=["calypso", technique.name],
        description=f"Calypso {technique.name} flow; runs after each acquisition event "
        f"({EVENT}) for {technique.name}, or by hand from this form.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def saved_flow_deployment(settings: CalypsoSettings):
    """Saved user flows, by name (and version), as one deployment: its form takes the flow
    name and the raw dataset; the run stays inside the flow's proposal."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from calypso.flows.user_flows import saved_flow

    trigger = DeploymentEventTrigger(
        name="saved flows after each acquisition",
        expect={EVENT},
        match={"calypso.technique": "saved-flow"},
        parameters={
            "name": _from_event("flow"),
            "raw": _from_event("raw"),
            "scans": _from_event("scans"),
            "trigger": _from_event("key"),
        },
    )
    return saved_flow.to_deployment(
        name="saved-flow",
        triggers=[trigger],
        concurrency_limit=settings.serve.default_concurrency,
        tags=["calypso", "user-flow"],
        description="Run a saved Calypso user flow (`calypso flows list`) on a raw dataset.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def start_shared_cluster(settings: CalypsoSettings):
    """A local cluster for every flow run served (None when the settings name a scheduler);
    flow runs, which are child processes, find it through CALYPSO_EXECUTOR__*."""
    from calypso.executors.dask import local_cluster_options, start_local_cluster

    if settings.executor.kind != "local":
        return None
    executor = settings.executor.model_copy(
        update={"preload": [technique.task_module for technique in TECHNIQUES.values()]}
    )
    cluster = start_local_cluster(**local_cluster_options(executor))
    os.environ["CALYPSO_EXECUTOR__KIND"] = "address"
    os.environ["CALYPSO_EXECUTOR__ADDRESS"] = cluster.scheduler_address
    return cluster


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
    from calypso.flows.runtime import check_prefect_api

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigurationError(
            "calypso serve needs a Prefect server: start one (`calypso server`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or CALYPSO_PREFECT_API_URL)"
        )
    check_prefect_api()
    chosen = [TECHNIQUES[name] for name in techniques] if techniques else TECHNIQUES.values()
    cluster = start_shared_cluster(settings)
    stop = threading.Event()
    start_icat_flushing(settings, stop)
    try:
        from prefect import serve as prefect_serve

        deployments = [technique_deployment(technique, settings) for technique in chosen]
        deployments.append(saved_flow_deployment(settings))
        limit = sum(d.concurrency_limit or 1 for d in deployments)
        # Deployments stay active when serve stops: runs triggered meanwhile wait for it.
        prefect_serve(
            *deployments, limit=limit, pause_on_shutdown=False, print_starting_message=True
        )
    finally:
        stop.set()
        if cluster is not None:
            cluster.close()
