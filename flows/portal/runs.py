"""Runs: the user's runs from the Prefect API (state, progress, the results table and
quick looks from the run's artifacts, logs), and the catalogue's records of a dataset.

**Whose runs.** Runs the portal launches (:mod:`.launch`) carry the tags
``calypso-proposal:<id>`` and ``calypso-user:<name>``; runs started elsewhere (``calypso
run``, ``calypso serve``) are found through the catalogue, whose records name their
proposal and flow run. The Prefect API is asked for those tags or ids only (filtered on
the server); the browser never talks to Prefect. A run in none of the user's proposals is
a 404, the same answer as a run that does not exist.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from calypso.flows.portal.app import PortalError, page
from calypso.flows.portal.auth import User
from calypso.flows.portal.paths import visible_proposals
from calypso.flows.results_table import portal_path
from calypso.registry.access import Identity
from calypso.registry.access.links import resolved

if TYPE_CHECKING:
    from calypso.registry.catalogue import ProcessedDataset
    from calypso.settings import CalypsoSettings

router = APIRouter()
PROPOSAL_TAG, USER_TAG = "calypso-proposal:", "calypso-user:"
LAUNCH_TAG = "calypso-launch:"


def dataset_records(settings: CalypsoSettings, raw: Path, limit: int = 200) -> list:
    """The catalogue's records of results made from ``raw``, newest first."""
    from calypso.registry import SQLiteCatalogue

    if not settings.catalogue_path.exists():
        return []
    real = str(resolved(raw))
    records = SQLiteCatalogue(settings.catalogue_path).list(limit=limit)
    return [r for r in records if str(resolved(r.raw_dataset)) == real]


def _proposal_records(settings: CalypsoSettings, proposals: set[str]) -> list[ProcessedDataset]:
    from calypso.registry import SQLiteCatalogue

    if not settings.catalogue_path.exists():
        return []
    records = SQLiteCatalogue(settings.catalogue_path).list(limit=500)
    return [r for r in records if (r.proposal or "").lower() in proposals and r.flow_run_id]


# -- reading runs ------------------------------------------------------------------------


async def _runs(settings: CalypsoSettings, identity: Identity, limit: int = 50) -> list:
    """The user's flow runs, newest first: tagged with one of their proposals, or named
    by a catalogue record of one (both asked of the Prefect API as filters)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    proposals = set(visible_proposals(settings, identity))
    filters = [FlowRunFilter(tags=FlowRunFilterTags(all_=[PROPOSAL_TAG + p])) for p in proposals]
    ids = [r.flow_run_id for r in _proposal_records(settings, proposals)]
    if ids:
        filters.append(FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in ids])))
    found: dict[Any, Any] = {}
    async with get_client() as client:
        for flow_run_filter in filters:
            for run in await client.read_flow_runs(
                flow_run_filter=flow_run_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=limit,
            ):
                found[run.id] = run
    runs = sorted(found.values(), key=lambda r: r.expected_start_time or r.created, reverse=True)
    return runs[:limit]


def _run_proposal(settings: CalypsoSettings, run: Any) -> str | None:
    for tag in run.tags or []:
        if tag.startswith(PROPOSAL_TAG):
            return tag.removeprefix(PROPOSAL_TAG)
    from calypso.registry import SQLiteCatalogue

    if settings.catalogue_path.exists():
        for record in SQLiteCatalogue(settings.catalogue_path).list(limit=500):
            if record.flow_run_id == str(run.id):
                return record.proposal
    return None


async def their_run(settings: CalypsoSettings, identity: Identity, run_id: str) -> Any:
    """The flow run ``run_id`` if it belongs to a proposal of ``identity``; else 404 (the
    same answer as for a run that does not exist)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = PortalError(404, f"no run {run_id} among yours")
    try:
        run_uuid = uuid.UUID(run_id)
    except ValueError:
        raise missing from None
    async with get_client() as client:
        try:
            run = await client.read_flow_run(run_uuid)
        except ObjectNotFound:
            raise missing from None
    proposal = _run_proposal(settings, run)
    if not identity.member_of(proposal):
        raise missing
    return run


@router.get("/runs")
async def runs_page(request: Request, identity: User) -> Response:
    settings = request.app.state.settings
    return page(request, "runs.html", runs=await _runs(settings, identity))


@router.get("/runs/{run_id}")
async def run_page(request: Request, identity: User, run_id: str) -> Response:
    """A run: state, progress, results table and quick looks (its artifacts), logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort

    settings = request.app.state.settings
    run = await their_run(settings, identity, run_id)
    async with get_client() as client:
        logs = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
            sort=LogSort.TIMESTAMP_ASC,
            limit=200,
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    proposal = _run_proposal(settings, run) or ""
    records = [
        r
        for r in await run_in_threadpool(_proposal_records, settings, {proposal})
        if r.flow_run_id == str(run.id)
    ]
    # An export names its run as the form said: only the run's proposal's exports are its.
    exports = [
        e
        for e in request.app.state.launches.values()
        if e.get("run") == str(run.id) and e.get("folder", "").partition("/")[0] == proposal
    ]
    return page(
        request,
        "run.html",
        run=run,
        logs=logs,
        artifacts=artifacts,
        records=[(r, portal_path(settings, r.processed_path)) for r in records],
        raw=portal_path(settings, str((run.parameters or {}).get("raw") or "")),
        technique=(run.parameters or {}).get("technique") or _technique_of(run),
        exports=exports,
    )


def _technique_of(run: Any) -> str | None:
    from calypso.flows.techniques import TECHNIQUES

    name = (run.name or "").split("/")[0]
    return next((t for t in TECHNIQUES if t in (run.tags or []) or t in name), None)
