"""Launching a technique's flow on a dataset from a form made from its parameter model
(its JSON schema), and rerunning a run with its parameters edited.

A launch runs :func:`calypso.flows.api.run_technique` in the portal's process (a
background thread) inside :func:`calypso.registry.access.acting_as` the signed-in
identity: the confinement check and every check inside the run are the user's, as
``calypso serve`` does for the account that submitted a run. Its flow run is tagged with
the proposal, the user and the launch (:data:`calypso.flows.portal.runs.PROPOSAL_TAG` ...),
which is how the runs pages find it on the Prefect server. It reduces on the configured
executor (``executor.kind = "address"``: the facility's cluster).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from calypso.flows.portal.app import PortalError, page, remember
from calypso.flows.portal.auth import User, check_csrf
from calypso.flows.portal.paths import locate, split
from calypso.flows.portal.runs import LAUNCH_TAG, PROPOSAL_TAG, USER_TAG, their_run
from calypso.registry.access import Identity

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

router = APIRouter()
logger = logging.getLogger("calypso.portal")


def _fields(schema: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The form's fields, from the parameter model's JSON schema."""
    fields = []
    for name, spec in schema.get("properties", {}).items():
        options = spec.get("anyOf", [spec])
        kinds = {o.get("type") for o in options if "type" in o}
        choices = next((o["enum"] for o in options if "enum" in o), None)
        value = values.get(name, spec.get("default"))
        shown = "" if value is None else value if isinstance(value, str) else json.dumps(value)
        if "boolean" in kinds:
            choices = ["true", "false"]
        fields.append(
            {
                "name": name,
                "title": spec.get("title", name),
                "description": spec.get("description", ""),
                "value": shown,
                "choices": [json.dumps(c) if not isinstance(c, str) else c for c in choices]
                if choices
                else None,
                "nullable": "null" in kinds,
                "path": spec.get("path"),
                "structured": bool(kinds & {"array", "object"}) or "$ref" in json.dumps(options),
            }
        )
    return fields


def _form_values(model: Any, form: dict[str, str]) -> dict[str, Any]:
    """What the form gives, as ``calypso run --set NAME=VALUE`` reads it (JSON, else
    text); empty fields keep their default."""
    from calypso.flows.api import _parse_value

    values = {}
    for name in model.model_fields:
        text = (form.get(name) or "").strip()
        if text:
            values[name] = _parse_value(text)
    return values


@router.get("/launch/{technique}")
async def launch_form(
    request: Request,
    identity: User,
    technique: str,
    input: str,
    rerun: str | None = None,
) -> Response:
    from calypso.flows.api import parameter_model
    from calypso.flows.techniques import TECHNIQUES

    if technique not in TECHNIQUES:
        raise PortalError(404, f"no technique {technique} (known: {', '.join(TECHNIQUES)})")
    settings = request.app.state.settings
    locate(settings, identity, *split(input))
    values: dict[str, Any] = {}
    if rerun:
        run = await their_run(settings, identity, rerun)
        values = dict((run.parameters or {}).get("parameters") or {})
    model = parameter_model(technique)
    return page(
        request,
        "launch.html",
        technique=technique,
        input=input,
        rerun=rerun,
        fields=_fields(model.model_json_schema(), values),
    )


@router.post("/launch/{technique}")
async def launch(request: Request, identity: User, technique: str) -> Response:
    from calypso.errors import CalypsoError
    from calypso.flows.api import confine_run, parameter_model, parameters_from
    from calypso.flows.portal.audit import record
    from calypso.flows.techniques import TECHNIQUES
    from calypso.registry.access import AccessError

    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    if technique not in TECHNIQUES:
        raise PortalError(404, f"no technique {technique}")
    settings = request.app.state.settings
    proposal, relative = split(form.get("input", ""))
    raw = locate(settings, identity, proposal, relative)
    values = _form_values(parameter_model(technique), form)
    action = "rerun" if form.get("rerun") else "launch"
    try:
        parameters = parameters_from(technique, values, " from the portal's form")
        await run_in_threadpool(
            confine_run, technique, str(raw), parameters, None, settings, identity
        )
    except AccessError as exc:
        record(
            settings,
            identity,
            action,
            proposal=proposal,
            target=relative,
            detail=str(exc),
            outcome="refused",
        )
        raise PortalError(403, str(exc)) from None
    except CalypsoError as exc:
        raise PortalError(422, str(exc)) from None
    launch_id = uuid.uuid4().hex
    action_id = record(
        settings,
        identity,
        action,
        proposal=proposal,
        target=relative,
        detail=json.dumps(
            {"technique": technique, "parameters": values, "rerun_of": form.get("rerun")}
        ),
        outcome="started",
    )
    entry = {
        "id": launch_id,
        "who": identity.name,
        "state": "starting",
        "technique": technique,
        "input": f"{proposal}/{relative}",
    }
    remember(request.app, launch_id, entry)

    def work(progress: Any) -> dict[str, Any]:
        from calypso.flows.api import run_technique

        return run_technique(
            technique,
            str(raw),
            parameters,
            None,
            None,
            settings,
            identity=identity,
            progress=progress,
        )

    run_in_background(settings, identity, proposal, entry, action_id, work)
    return RedirectResponse(f"/launches/{launch_id}", status_code=303)


def run_in_background(
    settings: CalypsoSettings,
    identity: Identity,
    proposal: str,
    entry: dict[str, Any],
    action_id: int,
    work: Callable[[Any], dict[str, Any]],
) -> None:
    """Start ``work(progress)`` (a run) in a thread, as ``identity``, followed in ``entry``."""
    threading.Thread(
        target=_run_job,
        args=(settings, identity, proposal, entry, action_id, work),
        name=f"portal-launch-{entry['id'][:8]}",
        daemon=True,
    ).start()


def _run_job(
    settings: CalypsoSettings,
    identity: Identity,
    proposal: str,
    entry: dict[str, Any],
    action_id: int,
    work: Callable[[Any], dict[str, Any]],
) -> None:
    """One launched run, as the signed-in user, its flow run tagged with its proposal."""
    from prefect import tags

    from calypso.flows.portal.audit import settle
    from calypso.registry.access import acting_as

    class Progress:  # what the launch's page shows until Prefect has the run
        def stage(self, text: str, *, started: bool = False) -> None:
            entry["stage"] = text

        def update_to(self, done: int, total: int) -> None:
            entry["progress"] = [done, total]

        def close(self) -> None:
            pass

    launch_tags = [
        PROPOSAL_TAG + proposal,
        USER_TAG + identity.name,
        LAUNCH_TAG + entry["id"],
        entry["technique"],
        "calypso-portal",
    ]
    try:
        entry["state"] = "running"
        # acting_as: every check inside the run is the user's (contexts do not cross into
        # a new thread: both are set here, in the run's own thread).
        with acting_as(identity), tags(*launch_tags):
            summary = work(Progress())
        run_id = summary.get("flow_run_id") or _tagged_run_id(entry["id"])
        entry |= {"state": "completed", "summary": summary, "run": run_id}
        link_from_prefect(settings, run_id, _result_folder(summary), proposal)
        detail = {"technique": entry["technique"], "flow_run_id": run_id}
        settle(settings, action_id, "completed", json.dumps(detail))
    except Exception as exc:  # the page says why; the record keeps it
        entry |= {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        settle(settings, action_id, "failed", entry["error"][:2000])


def _result_folder(summary: dict[str, Any]) -> str:
    variants = summary.get("variants") or [summary]  # a saved flow: one summary a variant
    return str(variants[0].get("processed_dataset_dir") or "")


def _tagged_run_id(launch_id: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[LAUNCH_TAG + launch_id])),
            limit=1,
        )
    return str(found[0].id) if found else None


def link_from_prefect(
    settings: CalypsoSettings, run_id: str | None, results: str, proposal: str
) -> None:
    """A markdown artifact on the flow run pointing at its portal pages, so that staff in
    the Prefect UI and users reach the same results (runs the portal launched)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    from calypso.flows.results_table import portal_path

    portal = settings.portal
    base = (portal.public_url or f"http://{portal.host}:{portal.port}").rstrip("/")
    folder = portal_path(settings, results)
    lines = [f"[This run in the Calypso portal]({base}/runs/{run_id})"]
    if folder:
        lines.append(f"[Its results ({proposal})]({base}/folder/{folder})")
    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(
                ArtifactCreate(
                    key="portal",
                    type="markdown",
                    data="\n\n".join(lines),
                    description="Where users see this run",
                    flow_run_id=run_id,
                )
            )
    except Exception:  # the run is done; a missing link is not worth failing it
        logger.warning("could not link run %s to the portal", run_id, exc_info=True)


async def _launched_run(launch_id: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client:
        found = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[LAUNCH_TAG + launch_id])),
            limit=1,
        )
    return found[0] if found else None


@router.get("/launches/{launch_id}")
async def launched(request: Request, identity: User, launch_id: str) -> Response:
    """Where a launch goes: its run's page once Prefect has it, else how it is doing."""
    entry = request.app.state.launches.get(launch_id)
    if entry is None or entry["who"] != identity.name:
        raise PortalError(404, f"no launch {launch_id} of yours")
    run = await _launched_run(launch_id)
    if run is not None:
        return RedirectResponse(f"/runs/{run.id}", status_code=303)
    return page(request, "launched.html", entry=entry)


@router.get("/api/launches/{launch_id}")
def launch_state(request: Request, identity: User, launch_id: str) -> dict:
    entry = request.app.state.launches.get(launch_id)
    if entry is None or entry["who"] != identity.name:
        raise PortalError(404, f"no launch {launch_id} of yours")
    return {k: v for k, v in entry.items() if k not in ("who", "summary")} | {
        "outputs": (entry.get("summary") or {}).get("outputs", []),
        "processed_dataset_dir": (entry.get("summary") or {}).get("processed_dataset_dir"),
    }
