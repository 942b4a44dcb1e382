"""Saved user flows (``calypso flows save``) launched on a dataset from the portal, as
they were saved (their specification, hashed, is not edited here).

A user sees the saved flows of their proposals and their own; the launch is checked by
:func:`calypso.flows.user_flows.confine_saved_flow` for the signed-in identity (the
dataset in the flow's proposal and in one of theirs), then runs like a technique's launch
(:func:`calypso.flows.portal.launch.run_in_background`), tagged and recorded.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from calypso.flows.portal.app import PortalError, remember
from calypso.flows.portal.auth import User, check_csrf
from calypso.flows.portal.launch import run_in_background
from calypso.flows.portal.paths import locate, split
from calypso.registry.access import Identity

if TYPE_CHECKING:
    from calypso.registry.saved_flows import SavedFlow
    from calypso.settings import CalypsoSettings

router = APIRouter()


def their_saved_flows(settings: CalypsoSettings, identity: Identity) -> list[SavedFlow]:
    """The latest version of each saved flow of ``identity``'s proposals, or of theirs."""
    from calypso.registry.saved_flows import SavedFlows

    if not settings.catalogue_path.exists():
        return []
    latest: dict[str, SavedFlow] = {}
    for flow in SavedFlows(settings.catalogue_path).list():  # by name, then version
        if identity.member_of(flow.proposal) or flow.owner == identity.name:
            latest[flow.name] = flow
    return list(latest.values())


@router.post("/launch-flow")
async def launch_saved_flow(request: Request, identity: User) -> Response:
    from calypso.errors import CalypsoError
    from calypso.flows.api import get_saved_flow, run_saved_flow
    from calypso.flows.portal.audit import record
    from calypso.flows.specification import check_specification
    from calypso.flows.user_flows import confine_saved_flow
    from calypso.registry.access import AccessError

    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    settings = request.app.state.settings
    proposal, relative = split(form.get("input", ""))
    raw = locate(settings, identity, proposal, relative)
    label = form.get("flow", "")
    missing = PortalError(404, f"no saved flow {label} among yours")
    try:
        flow = await run_in_threadpool(get_saved_flow, label, settings)
    except CalypsoError:
        raise missing from None
    if not (identity.member_of(flow.proposal) or flow.owner == identity.name):
        raise missing
    try:
        spec = check_specification(flow.checked().specification, flow.label)
        await run_in_threadpool(confine_saved_flow, identity, flow, spec, str(raw), None, settings)
    except AccessError as exc:
        record(
            settings,
            identity,
            "launch saved flow",
            proposal=proposal,
            target=relative,
            detail=str(exc),
            outcome="refused",
        )
        raise PortalError(403, str(exc)) from None
    except CalypsoError as exc:  # a version altered in the registry, a bad specification
        raise PortalError(422, str(exc)) from None
    launch_id = uuid.uuid4().hex
    action_id = record(
        settings,
        identity,
        "launch saved flow",
        proposal=proposal,
        target=relative,
        detail=json.dumps({"flow": flow.label, "sha256": flow.sha256}),
        outcome="started",
    )
    entry = {
        "id": launch_id,
        "who": identity.name,
        "state": "starting",
        "technique": flow.technique,
        "flow": flow.label,
        "input": f"{proposal}/{relative}",
    }
    remember(request.app, launch_id, entry)

    def work(progress: Any) -> dict[str, Any]:
        entry["stage"] = f"running {flow.label}"
        return run_saved_flow(flow, str(raw), None, None, settings, identity=identity)

    run_in_background(settings, identity, proposal, entry, action_id, work)
    return RedirectResponse(f"/launches/{launch_id}", status_code=303)
