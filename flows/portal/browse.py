"""The data browser: proposals -> sessions -> collections -> datasets, RAW_DATA and
PROCESSED_DATA side by side (the ESRF data policy: ``<proposal>/<beamline>/<session>/
RAW_DATA/<collection>/<collection>_<dataset>``, results mirrored under PROCESSED_DATA),
any folder of a proposal, and the h5web page of any HDF5/NeXus file.

Every page takes its path through :func:`calypso.flows.portal.paths.locate`; entries
whose symlinks lead out of the proposal are listed as such, never linked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from calypso.flows.portal.app import VIEWER_MISSING, PortalError, page, viewer_built
from calypso.flows.portal.auth import User
from calypso.flows.portal.paths import (
    locate,
    opened_in_proposal,
    proposal_folder,
    visible_proposals,
)
from calypso.registry.access.links import HDF5_SUFFIXES, resolved

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

router = APIRouter()
RAW, PROCESSED = "RAW_DATA", "PROCESSED_DATA"
MAX_ENTRIES = 500  # a page lists this many files; the folder page shows the rest


@dataclass
class Entry:
    """A file or folder as a page shows it."""

    name: str
    relative: str  # inside the proposal, for links
    is_dir: bool
    size: int
    outside: bool  # a symlink out of the proposal: shown, not linked

    @property
    def hdf5(self) -> bool:
        return self.name.lower().endswith(HDF5_SUFFIXES)


def _subfolders(settings: CalypsoSettings, folder: Path) -> list[str]:
    """The folders in ``folder``, listed where the kernel keeps the portal inside the
    proposal (a folder swapped for a symlink since the check lists nothing)."""

    def listed() -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
        except OSError:
            return []

    return opened_in_proposal(settings, folder, listed)


def _entries(
    settings: CalypsoSettings, folder: Path, proposal_dir: Path, recursive: bool
) -> list[Entry]:
    """Files (and, not recursive, folders) under ``folder``; hidden part folders skipped.
    Listed where the kernel keeps the portal inside the proposal, as :func:`_subfolders`."""
    return opened_in_proposal(settings, folder, _entries_in, folder, proposal_dir, recursive)


def _entries_in(folder: Path, proposal_dir: Path, recursive: bool) -> list[Entry]:
    top = resolved(proposal_dir)
    found: list[Entry] = []
    if not folder.is_dir():
        return found
    walk = os.walk(folder) if recursive else [next(os.walk(folder), (str(folder), [], []))]
    for base, folders, files in walk:
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        names = [(n, False) for n in sorted(files)]
        if not recursive:
            names = [(n, True) for n in folders] + names
        for name, is_dir in names:
            path = Path(base) / name
            real = resolved(path)
            outside = not real.is_relative_to(top)
            try:
                size = 0 if is_dir or outside else path.stat().st_size
            except OSError:
                size = 0
            relative = str(path.relative_to(proposal_dir))
            found.append(Entry(name, relative, is_dir, size, outside))
            if len(found) >= MAX_ENTRIES:
                return found
    return found


def _settings(request: Request):
    return request.app.state.settings


@router.get("/")
def home(request: Request, identity: User) -> Response:
    from calypso.flows.portal.audit import actions

    settings = _settings(request)
    return page(
        request,
        "home.html",
        proposals=visible_proposals(settings, identity),
        actions=actions(settings, identity.name, limit=10),
    )


@router.get("/data/{proposal}")
def sessions(request: Request, identity: User, proposal: str) -> Response:
    """The sessions of a proposal: ``<beamline>/<session>`` folders holding data."""
    settings = _settings(request)
    folder = locate(settings, identity, proposal)
    found = [
        (beamline, session)
        for beamline in _subfolders(settings, folder)
        for session in _subfolders(settings, folder / beamline)
        if {RAW, PROCESSED} & set(_subfolders(settings, folder / beamline / session))
    ]
    return page(request, "proposal.html", proposal=proposal, sessions=found)


@router.get("/session/{proposal}/{beamline}/{session}")
def collections(
    request: Request,
    identity: User,
    proposal: str,
    beamline: str,
    session: str,
) -> Response:
    """Each collection with its datasets, and which have results."""
    settings = _settings(request)
    folder = locate(settings, identity, proposal, f"{beamline}/{session}")
    table: dict[str, dict[str, tuple[bool, bool]]] = {}
    for side, present in ((RAW, (True, False)), (PROCESSED, (False, True))):
        for collection in _subfolders(settings, folder / side):
            for dataset in _subfolders(settings, folder / side / collection):
                raw, processed = table.setdefault(collection, {}).get(dataset, (False, False))
                table[collection][dataset] = (raw or present[0], processed or present[1])
    return page(
        request,
        "session.html",
        proposal=proposal,
        beamline=beamline,
        session=session,
        collections={c: dict(sorted(d.items())) for c, d in sorted(table.items())},
    )


@router.get("/dataset/{proposal}/{beamline}/{session}/{collection}/{dataset}")
def dataset(
    request: Request,
    identity: User,
    proposal: str,
    beamline: str,
    session: str,
    collection: str,
    dataset: str,
) -> Response:
    """A dataset: its raw files and its results side by side; process it."""
    from calypso.flows.portal.runs import dataset_records
    from calypso.flows.portal.saved import their_saved_flows
    from calypso.flows.techniques import TECHNIQUES

    settings = _settings(request)
    session_path = f"{beamline}/{session}"
    raw = locate(settings, identity, proposal, f"{session_path}/{RAW}/{collection}/{dataset}")
    processed = locate(
        settings, identity, proposal, f"{session_path}/{PROCESSED}/{collection}/{dataset}"
    )
    if not raw.is_dir() and not processed.is_dir():
        raise PortalError(404, f"no dataset {collection}/{dataset} in {proposal}/{session_path}")
    proposal_dir = proposal_folder(settings, proposal)
    assert proposal_dir is not None  # locate found it
    return page(
        request,
        "dataset.html",
        proposal=proposal,
        beamline=beamline,
        session=session,
        collection=collection,
        dataset=dataset,
        raw_relative=str(raw.relative_to(proposal_dir)),
        raw_files=_entries(settings, raw, proposal_dir, recursive=True),
        processed_files=_entries(settings, processed, proposal_dir, recursive=True),
        techniques=list(TECHNIQUES),
        saved_flows=their_saved_flows(settings, identity),
        records=dataset_records(settings, raw),
    )


@router.get("/folder/{proposal}/{relative:path}")
def folder(request: Request, identity: User, proposal: str, relative: str) -> Response:
    """Any folder of a proposal."""
    settings = _settings(request)
    path = locate(settings, identity, proposal, relative)
    if not path.is_dir():
        raise PortalError(404, f"no folder {proposal}/{relative}")
    proposal_dir = proposal_folder(settings, proposal)
    assert proposal_dir is not None
    entries = _entries(settings, path, proposal_dir, recursive=False)
    return page(request, "folder.html", proposal=proposal, relative=relative, entries=entries)


@router.get("/view/{proposal}/{relative:path}")
def view(request: Request, identity: User, proposal: str, relative: str) -> Response:
    """An HDF5/NeXus file in h5web; the file's default plot (NeXus ``default``) at once."""
    from calypso.flows.portal.audit import record
    from calypso.flows.portal.paths import readable_file

    settings = _settings(request)
    readable_file(settings, identity, f"{proposal}/{relative}")
    record(settings, identity, "view", proposal=proposal, target=relative)
    return page(
        request,
        "view.html",
        proposal=proposal,
        relative=relative,
        file=f"{proposal}/{relative}",
        built=viewer_built(),
        missing=VIEWER_MISSING,
    )
