"""Exporting a processed dataset to the configured object store (or folder), as
:func:`calypso.flows.api.export_processed` does for ``calypso export``: confined to the
signed-in user's proposals, recorded in the catalogue, followed on its page."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from calypso.flows.portal.app import PortalError, page, remember
from calypso.flows.portal.auth import User, check_csrf
from calypso.flows.portal.paths import locate, split
from calypso.registry.access import Identity

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

router = APIRouter()


@router.post("/export")
async def export(request: Request, identity: User) -> Response:
    """Export a processed dataset (``<proposal>/<folder>``) to the configured target."""
    from calypso.flows.portal.audit import record

    form = {k: str(v) for k, v in (await request.form()).items()}
    check_csrf(request, form.get("csrf", ""))
    settings = request.app.state.settings
    proposal, relative = split(form.get("folder", ""))
    folder = locate(settings, identity, proposal, relative)
    if not folder.is_dir():
        raise PortalError(404, f"no folder {proposal}/{relative}")
    # One place per dataset in the store: <target>/<proposal>/<its path in the proposal>,
    # so that two proposals' folders of the same name never meet.
    target = f"{settings.export_target.rstrip('/')}/{proposal}/{relative.strip('/')}"
    export_id = uuid.uuid4().hex
    action_id = record(
        settings,
        identity,
        "export",
        proposal=proposal,
        target=relative,
        detail=target,
        outcome="started",
    )
    entry = {
        "id": export_id,
        "who": identity.name,
        "state": "exporting",
        "folder": f"{proposal}/{relative}",
        "run": form.get("run"),
    }
    remember(request.app, export_id, entry)
    threading.Thread(
        target=_run_export,
        args=(settings, identity, folder, target, entry, action_id),
        daemon=True,
    ).start()
    return RedirectResponse(f"/exports/{export_id}", status_code=303)


def _run_export(
    settings: CalypsoSettings,
    identity: Identity,
    folder: Path,
    target: str,
    entry: dict,
    action_id: int,
) -> None:
    from calypso.flows.portal.audit import settle
    from calypso.registry.access import Intent, confine
    from calypso.tasks.export import (
        dataset_to_export,
        export_dataset,
        export_summary,
        record_export,
    )

    def progress(done: int, total: int) -> None:  # bytes sent, for the export's page
        entry["progress"] = [done, total]

    try:
        # What calypso.flows.api.export_processed does, with the bytes sent reported.
        source, record = dataset_to_export(str(folder), settings)
        confine(identity, Intent("export", export_source=str(source), export_to=target), settings)
        report = export_dataset(source, target, settings, progress=progress, record=record)
        summary = export_summary(report, record_export(report, record and record.id, settings))
        entry |= {"state": "completed", "summary": summary}
        settle(
            settings, action_id, "completed", f"{summary.get('uri')}: {summary.get('files')} files"
        )
    except Exception as exc:  # an AccessError included: the export was refused
        entry |= {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        settle(
            settings,
            action_id,
            "refused" if "refused" in str(exc) else "failed",
            entry["error"][:2000],
        )


@router.get("/exports/{export_id}")
def export_page(request: Request, identity: User, export_id: str) -> Response:
    entry = request.app.state.launches.get(export_id)
    if entry is None or entry["who"] != identity.name:
        raise PortalError(404, f"no export {export_id} of yours")
    return page(request, "export.html", entry=entry)


@router.get("/api/exports/{export_id}")
def export_state(request: Request, identity: User, export_id: str) -> dict:
    entry = request.app.state.launches.get(export_id)
    if entry is None or entry["who"] != identity.name:
        raise PortalError(404, f"no export {export_id} of yours")
    return {k: v for k, v in entry.items() if k != "who"}
