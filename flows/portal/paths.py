"""Every path the portal touches comes from here, checked.

A URL names a file as ``<proposal>/<path inside the proposal>``. :func:`locate` refuses a
proposal the user is not a member of (404: not even its existence is told), any ``..``,
``.`` or empty component, before or after one more round of percent-decoding (``%2e%2e``
sent encoded twice), and a path whose real location (symlinks resolved) is outside the
proposal's folder (403). :func:`readable_file` then passes the file through the one
confinement check (:func:`calypso.registry.access.confine`), which also follows its HDF5
external links and virtual dataset sources: a file whose links lead into another proposal
is refused as a whole.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

from calypso.flows.portal.app import PortalError
from calypso.registry.access import AccessError, Identity, Intent, confine
from calypso.registry.access.landlock import proposal_confinement, within
from calypso.registry.access.links import resolved, signature

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

_CONFINED_TTL_S = 10.0  # h5web asks dozens of times per file: one check serves them
_confined: dict[tuple, tuple] = {}  # (user, path) -> (until, paths looked at, their signature)
_lock = threading.Lock()


Result = TypeVar("Result")


def _not_found(proposal: str) -> PortalError:
    return PortalError(404, f"no proposal {proposal} among yours")


def proposal_folder(settings: CalypsoSettings, proposal: str) -> Path | None:
    """``<root>/<proposal>`` under the first data root that has it; a proposal folder that
    is a symlink to somewhere else (another proposal) is none."""
    for root in settings.data_roots:
        folder = Path(root) / proposal
        if folder.is_dir() and resolved(folder) == resolved(root) / proposal:
            return folder
    return None


def visible_proposals(settings: CalypsoSettings, identity: Identity) -> list[str]:
    """The proposals ``identity`` sees that have a folder under the data roots."""
    pattern = re.compile(settings.access.proposal_id, re.I)
    found: set[str] = set()
    for root in settings.data_roots:
        try:
            names = [entry.name for entry in os.scandir(root) if entry.is_dir()]
        except OSError:
            continue
        found.update(name for name in names if pattern.fullmatch(name) and identity.member_of(name))
    return sorted(found)


def _components(relative: str) -> list[str]:
    parts = relative.split("/") if relative else []
    for part in parts:
        decoded = unquote(part)
        if (
            part in ("", ".", "..")
            or decoded in (".", "..")
            or "\x00" in decoded
            or "/" in decoded
            or "\\" in decoded
        ):
            raise PortalError(403, f"refused: {relative!r} is not a plain path ('..' or '.')")
        if len(part.encode()) > 255:  # the file system would refuse it (ENAMETOOLONG)
            raise PortalError(404, f"no such file or folder: a name of {len(part)} characters")
    return parts


def locate(
    settings: CalypsoSettings, identity: Identity, proposal: str, relative: str = ""
) -> Path:
    """The path ``relative`` inside ``proposal``'s folder, once checked (module docstring)."""
    if not re.fullmatch(settings.access.proposal_id, proposal, re.I) or not identity.member_of(
        proposal
    ):
        raise _not_found(proposal)
    parts = _components(relative)
    folder = proposal_folder(settings, proposal)
    if folder is None:
        raise _not_found(proposal)
    path = folder.joinpath(*parts)
    if len(str(path).encode()) >= 4096:  # PATH_MAX: the file system would refuse it
        raise PortalError(404, f"no such file or folder: a path of {len(str(path))} characters")
    real, real_folder = resolved(path), resolved(folder)
    if not (real == real_folder or real.is_relative_to(real_folder)):
        raise PortalError(403, f"refused: {proposal}/{relative} leads outside proposal {proposal}")
    return path


def split(file: str) -> tuple[str, str]:
    """``<proposal>/<relative>`` as the viewer sends it."""
    proposal, _, relative = file.strip("/").partition("/")
    return proposal, relative


def readable_file(settings: CalypsoSettings, identity: Identity, file: str) -> Path:
    """A file whose content may be sent to ``identity``: :func:`locate`, then the one
    confinement check on it (HDF5 links followed); the result kept a few seconds for
    the same file unchanged."""
    proposal, relative = split(file)
    path = locate(settings, identity, proposal, relative)
    try:
        status = path.stat()
    except OSError:
        raise PortalError(404, f"no file {file}") from None
    if not stat.S_ISREG(status.st_mode):
        raise PortalError(404, f"{file} is not a file")
    # A verdict is kept while nothing it looked at changed: the file, each file its links
    # may open (there or not) and where each leads, by identity and change time (a file's
    # owner can set its mtime back, not its ctime).
    key = (identity.name, str(path))
    now = time.monotonic()
    with _lock:
        kept = _confined.get(key)
    if kept is not None and kept[0] > now and signature(kept[1]) == kept[2]:
        return path
    intent = Intent("portal read", raw=str(path), output=str(path.parent))
    try:
        looked = confine(identity, intent, settings).looked
    except AccessError as exc:
        raise PortalError(403, str(exc)) from None
    with _lock:
        if len(_confined) > 10_000:
            _confined.clear()
        _confined[key] = (now + _CONFINED_TTL_S, looked, signature(looked))
    return path


def opened_in_proposal(
    settings: CalypsoSettings, path: Path, function: Callable[..., Result], *args: object
) -> Result:
    """``function(*args)`` where the kernel lets the portal open files and list folders of
    ``path``'s proposal only, read only: the check looked at the path (and a file's links)
    just before; this holds whatever a member of the proposal changed since."""
    confinement = proposal_confinement(settings, path)
    try:
        return within(confinement and confinement.reading_only(), function, *args)
    except AccessError as exc:
        raise PortalError(403, str(exc)) from None
