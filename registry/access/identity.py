"""Who is asking: a verified identity, never a setting.

- On the command line: the Unix account of the process (``os.getuid`` -> ``pwd``), its
  groups from the operating system (``os.getgrouplist``: LDAP-backed through NSS on
  facility machines).
- On the web (the portal): a sign-in through LDAP (:mod:`.ldap`) or OpenID Connect
  (:mod:`.oidc`).
- ``calypso serve`` and Prefect workers act for the facility: the service identity.

Proposals come from groups: ``access.proposal_groups`` patterns (``{proposal}``,
``esrf-{proposal}``) map group names to proposal ids; members of ``access.staff_groups``
see every proposal. With no pattern configured (the embedded default, one machine), a
Unix account's proposals are the proposal folders it owns under the data roots, and with
no data roots either, every proposal: the account's own permissions decide
(docs/security.md, "The embedded default").

The library takes an :class:`Identity` from its caller: the entry points (CLI, portal)
build it from a verified source; :func:`acting_as` lets tests and the portal inject one.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from calypso.settings import AccessSettings, CalypsoSettings

Source = Literal["unix", "ldap", "oidc", "service"]


@dataclass(frozen=True)
class Identity:
    """Someone (or the service) whose identity was verified, and what they may see.

    ``proposals``: ids, lower case. ``all_proposals``: staff, the service, or the one
    user of a machine without data roots. ``why``: how the proposals were found (shown by
    ``calypso whoami``).
    """

    name: str
    source: Source
    groups: frozenset[str] = frozenset()
    proposals: frozenset[str] = frozenset()
    all_proposals: bool = False
    staff: bool = False
    uid: int | None = None
    why: str = ""

    def __post_init__(self) -> None:
        # Any iterable of ids, compared without case.
        object.__setattr__(self, "groups", frozenset(self.groups))
        object.__setattr__(self, "proposals", frozenset(p.lower() for p in self.proposals))

    def member_of(self, proposal: str | None) -> bool:
        return proposal is not None and (self.all_proposals or proposal.lower() in self.proposals)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source})"

    def describe_proposals(self) -> str:
        if self.all_proposals:
            return "every proposal"
        return ", ".join(sorted(self.proposals)) or "none"


# -- groups -> proposals -------------------------------------------------------------------


def _group_pattern(pattern: str, proposal_id: str) -> re.Pattern[str]:
    before, found, after = pattern.partition("{proposal}")
    if not found:
        from calypso.errors import ConfigurationError

        raise ConfigurationError(
            f"access.proposal_groups: {pattern!r} has no '{{proposal}}' (e.g. '{{proposal}}' "
            "for groups named ma1234, 'esrf-{proposal}' for esrf-ma1234)"
        )
    return re.compile(f"{re.escape(before)}(?P<proposal>{proposal_id}){re.escape(after)}", re.I)


def proposals_of_groups(groups: Iterable[str], access: AccessSettings) -> set[str]:
    """Proposal ids of the groups that match a pattern of ``access.proposal_groups``."""
    patterns = [_group_pattern(p, access.proposal_id) for p in access.proposal_groups]
    found = set()
    for group in groups:
        for pattern in patterns:
            match = pattern.fullmatch(group)
            if match:
                found.add(match["proposal"].lower())
    return found


def identity_from_groups(
    name: str,
    source: Source,
    groups: Iterable[str],
    access: AccessSettings,
    *,
    proposals: Iterable[str] = (),
    uid: int | None = None,
) -> Identity:
    """An identity whose proposals come from its groups (and ``proposals`` a trusted source
    listed directly, such as an OIDC claim); staff from ``access.staff_groups``."""
    groups = frozenset(groups)
    staff = bool(groups & set(access.staff_groups))
    found = proposals_of_groups(groups, access) | {p.lower() for p in proposals}
    why = (
        f"staff (group {', '.join(sorted(groups & set(access.staff_groups)))})"
        if staff
        else f"groups matching {', '.join(access.proposal_groups) or 'no pattern'}"
    )
    return Identity(
        name, source, groups, frozenset(found), all_proposals=staff, staff=staff, uid=uid, why=why
    )


# -- the Unix account -------------------------------------------------------------------------


def unix_groups(name: str, gid: int) -> set[str]:
    """Names of the account's groups, from the OS (NSS: files, LDAP/SSSD)."""
    names = set()
    for group_id in os.getgrouplist(name, gid):
        try:
            names.add(grp.getgrgid(group_id).gr_name)
        except KeyError:  # a gid without a name
            names.add(str(group_id))
    return names


def owned_proposals(roots: Iterable[Path], uid: int) -> set[str]:
    """Proposal folders (``<root>/<proposal>``) owned by ``uid``: the embedded default."""
    found = set()
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == uid:
                    found.add(entry.name.lower())
            except OSError:
                continue
    return found


def unix_identity(settings: CalypsoSettings, uid: int | None = None) -> Identity:
    """The account running this process, verified by the OS."""
    uid = os.getuid() if uid is None else uid
    account = pwd.getpwuid(uid)
    groups = unix_groups(account.pw_name, account.pw_gid)
    access = settings.access
    identity = identity_from_groups(account.pw_name, "unix", groups, access, uid=uid)
    if identity.staff or access.proposal_groups:
        return identity
    # The embedded default: no mapping from groups to proposals is configured.
    if not settings.data_roots:
        why = "no data roots (CALYPSO_DATA_ROOTS) on this machine: the account's permissions decide"
        return replace(identity, all_proposals=True, why=why)
    owned = owned_proposals(settings.data_roots, uid)
    why = "the proposal folders this account owns under the data roots"
    return replace(identity, proposals=frozenset(owned), why=why)


def service_identity(settings: CalypsoSettings) -> Identity:
    """``calypso serve`` and Prefect workers: the service account acting for the facility
    (every proposal; each run still stays inside one proposal of the data roots)."""
    account = pwd.getpwuid(os.getuid())
    return Identity(
        account.pw_name,
        "service",
        all_proposals=True,
        staff=True,
        uid=os.getuid(),
        why="the service acting for the facility",
    )


# -- who acts now --------------------------------------------------------------------------

_acting: ContextVar[Identity | None] = ContextVar("calypso_identity", default=None)


@contextmanager
def acting_as(identity: Identity) -> Iterator[Identity]:
    """Everything Calypso does inside the block acts for ``identity`` (the portal: the
    signed-in user of a request; tests: a user signed in through a real directory)."""
    token = _acting.set(identity)
    try:
        yield identity
    finally:
        _acting.reset(token)


def current_identity(settings: CalypsoSettings) -> Identity:
    """Who acts: the identity given by :func:`acting_as`, else this process's Unix account."""
    given = _acting.get()
    return given if given is not None else unix_identity(settings)
