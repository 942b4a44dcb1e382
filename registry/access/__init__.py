"""Identity and access: who is asking (a verified identity, never a setting), which
proposals they may see, and the one confinement check every entry point calls before it
reads or writes anything (docs/security.md).

- :mod:`.identity`: :class:`Identity`, the Unix account, groups -> proposals, staff;
- :mod:`.ldap`, :mod:`.oidc`: sign-in through a directory or an OpenID Connect issuer;
- :mod:`.confine`: :func:`confine`, the check, with :mod:`.links` (symlinks, HDF5
  external links and virtual dataset sources).
"""

from calypso.registry.access.confine import Confined, Intent, confine
from calypso.registry.access.errors import AccessError, SignInError
from calypso.registry.access.identity import (
    Identity,
    acting_as,
    current_identity,
    identity_from_groups,
    service_identity,
    unix_identity,
)

__all__ = [
    "AccessError",
    "Confined",
    "Identity",
    "Intent",
    "SignInError",
    "acting_as",
    "confine",
    "current_identity",
    "identity_from_groups",
    "require_data_roots",
    "served_run",
    "service_identity",
    "unix_identity",
]


def served_run() -> bool:
    """True inside a flow run that a deployment started (``calypso serve``, a Prefect
    worker): nobody's identity was checked before it, so the run checks itself, as the
    service."""
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return False
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def require_data_roots(settings, service: str, watched=()) -> None:
    """Services fail closed: ``service`` (serve, watch, the portal) acts for everyone, so it
    refuses to start without data roots, and ``watched`` folders must lie inside them.

    Raises
    ------
    ConfigurationError
        Saying what to set.
    """
    from calypso.errors import ConfigurationError
    from calypso.registry.access.links import resolved

    if not settings.data_roots:
        raise ConfigurationError(
            f"{service} refuses to start without data roots: set CALYPSO_DATA_ROOTS (e.g. "
            '["/data/visitor"]); every run it starts stays inside one proposal under them '
            "(docs/security.md)"
        )
    for root in settings.data_roots:
        if not resolved(root).is_dir():
            raise ConfigurationError(
                f"{service}: the data root {root} is not a folder (CALYPSO_DATA_ROOTS): mount "
                "it, or correct the setting; every run under it would be refused"
            )
    roots = [resolved(root) for root in settings.data_roots]
    for folder in watched:
        real = resolved(folder)
        if not any(real == root or real.is_relative_to(root) for root in roots):
            raise ConfigurationError(
                f"{service}: {folder} is outside the data roots "
                f"({', '.join(map(str, settings.data_roots))}): add it to CALYPSO_DATA_ROOTS"
            )
