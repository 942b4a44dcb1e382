"""The settings of Calypso's services and of who may see what: ``calypso watch`` and
``calypso serve``, saved user flows, the local Prefect server, sign-in and proposals.

Sections of :class:`calypso.settings.CalypsoSettings` (kept here so that neither file
grows past what one reads at once); import them from :mod:`calypso.settings`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
)


class WatchRule(BaseModel):
    """Which scans of a beamline a technique reduces, and with which default parameters.

    A scan matches when every pattern given matches (shell patterns, case-insensitive):
    ``detector`` against the names of its 2D detectors (any), ``title`` against its title.
    """

    model_config = ConfigDict(extra="forbid")

    technique: str = Field(
        ...,
        description="A technique (its built-in flow), or 'flow:NAME' for a saved user flow "
        "(its latest version).",
    )
    detector: str | None = Field(None, description="e.g. 'pilatus*', 'eiger*'")
    title: str | None = Field(None, description="e.g. 'fscan*', '*xas*', 'tomo:*'")
    unit: Literal["scan", "dataset"] = Field(
        "scan",
        description="'scan': each finished scan is reduced alone (diffraction, MX); "
        "'dataset': the whole dataset once it is finished and quiet (tomography sequences, "
        "repeated XAS scans to merge).",
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Defaults for this beamline, e.g. its PONI file."
    )
    since: datetime | None = Field(
        None,
        description="Scans that started before this time (a TOML date-time; local time "
        "without an offset) are left to the rules after this one, or alone: set it when a "
        "rule's parameters change, or Calypso is upgraded, to reduce only the acquisitions "
        "from then on (a new key would otherwise process every finished dataset again).",
    )

    @field_validator("since")
    @classmethod
    def _aware(cls, when: datetime | None) -> datetime | None:
        return when.astimezone() if when is not None else None  # naive: local time


class WatchSettings(BaseModel):
    """``calypso watch``: how RAW_DATA trees are followed and scans routed to flows."""

    interval_s: float = Field(10.0, gt=0, description="Seconds between two polls of a tree.")
    inotify: bool = Field(
        True,
        description="Also listen for dataset files written on this machine (inotify): a "
        "scan is announced within a second of its end instead of at the next poll. Other "
        "NFS/GPFS clients' writes are seen by the polls only; turn it off on trees too "
        "large for the kernel's inotify watch limit.",
    )
    quiet_s: float = Field(
        60.0,
        ge=0,
        description="A dataset whose files have not changed for this long is finished "
        "(scans without end_time included: a crashed acquisition still gets reduced).",
    )
    beamlines: dict[str, list[WatchRule]] = Field(
        default_factory=dict,
        description="Rules per beamline name (as in the data path); '*' applies to any "
        "beamline without rules of its own.",
    )
    state_path: Path | None = Field(
        None, description="SQLite file of the watcher's state (default: <home>/watch.sqlite)."
    )
    confirm_s: float = Field(
        300.0,
        gt=0,
        description="An announcement with no flow run after this long is posted again (the "
        "server may be slow to turn a burst of events into runs: keep it generous).",
    )
    attempts: int = Field(5, ge=1, description="Posts of one announcement at most.")
    blissdata_url: str | None = Field(
        None,
        description="Bliss's data-stream server (redis://host:port; `calypso watch "
        "--blissdata URL` too): the watcher follows scan starts there, and a scan whose rule "
        "names a live technique (diffraction, MX) starts its live run in `calypso serve` at "
        "once (docs/live.md). A password in it is a secret (never logged); events carry the "
        "URL without it, and served live runs take it from this setting.",
    )
    live_from_files: bool = Field(
        False,
        description="A dataset file seen while one of its scans is still being written (no "
        "end_time, files changed within quiet_s), whose rule names a live technique, starts "
        "the live run in `calypso serve` following the growing files, without blissdata "
        "(docs/live.md). Off by default: on NFS/GPFS a watcher sees other clients' writes "
        "only at its polls.",
    )

    @field_validator("blissdata_url")
    @classmethod
    def _hide_password(cls, url: str | None) -> str | None:
        # The password alone is hidden, so that logs still say which server (the whole
        # URL, as a SecretStr, would be blanked out of every message naming it).
        from calypso.registry.access.secrets import remember

        if url:
            remember(urlsplit(url).password)
        return url


class ServeSettings(BaseModel):
    """``calypso serve``: the deployments it serves."""

    concurrency: dict[str, int] = Field(
        default_factory=dict, description="Flow runs at once per technique (overrides default)."
    )
    default_concurrency: int | None = Field(
        None,
        ge=1,
        description="Flow runs at once per technique and per saved flow (default: each "
        "technique's own, from its descriptor: 1 for tomography, 2 for the others).",
    )
    icat_flush_interval_s: float = Field(
        300.0, gt=0, description="How often pending ICAT registrations are retried."
    )
    result_storage: Path | None = Field(
        None,
        description="Where task results are kept so a retried run skips finished chunks "
        "(default: <home>/results; made 0700, its files 0600).",
    )
    result_max_age_h: float = Field(
        72.0,
        gt=0,
        description="Kept task results expire after this many hours: not reused, and "
        "removed when a run or serve starts.",
    )
    socket: Path | None = Field(
        None,
        description="Unix socket on which serve takes runs that `calypso run` and "
        "`calypso.run` submit (default: <home>/serve.sock).",
    )
    submit_runs: bool = Field(
        True,
        description="`calypso run` and `calypso.run` send their run to the service when one "
        "listens on the socket (false: always run in the command's own processes).",
    )
    poll_s: float = Field(
        1.0,
        gt=0,
        description="How often serve asks the Prefect server for flow runs to start, besides "
        "when the server's event stream says one was scheduled (then at once); without that "
        "stream a triggered or launched run waits at most this long (Prefect's own default "
        "is 10 s).",
    )
    warm_starts: bool = Field(
        True,
        description="Start each served flow run from a fork server that has imported "
        "Prefect and the techniques' code once (false: a fresh interpreter per run, "
        "seconds of imports each).",
    )
    saved_flow_poll_s: float = Field(
        30.0,
        gt=0,
        description="How often serve looks for saved flows that are new, have a new version "
        "or were deleted (each saved flow has its own deployment).",
    )


class LdapSettings(BaseModel):
    """Sign-in through an LDAP directory (the portal, ``calypso whoami --ldap``): a simple bind
    as the user, then their groups read from the directory."""

    url: str | None = Field(None, description="e.g. ldaps://ldap.example.org or ldap://host:389")
    start_tls: bool = Field(False, description="StartTLS on an ldap:// connection.")
    ca_file: Path | None = Field(None, description="CA certificates for ldaps:// or StartTLS.")
    user_dn: str | None = Field(
        None,
        description="DN of a user, '{username}' replaced: uid={username},ou=people,dc=example,"
        "dc=org. Unset: the user is searched under user_base (with bind_dn when set).",
    )
    user_base: str | None = Field(None, description="Where users are searched.")
    user_filter: str = Field("(uid={username})", description="Finds a user under user_base.")
    bind_dn: str | None = Field(None, description="Service account for the search (optional).")
    bind_password: SecretStr | None = None
    group_base: str | None = Field(None, description="Where groups are searched.")
    group_filter: str = Field(
        "(|(&(objectClass=posixGroup)(memberUid={username}))"
        "(&(objectClass=groupOfNames)(member={user_dn})))",
        description="A user's groups: posixGroup memberUid or groupOfNames member.",
    )
    group_name_attribute: str = Field("cn", description="The attribute naming a group.")
    timeout_s: float = Field(5.0, gt=0)


class OidcSettings(BaseModel):
    """Sign-in through OpenID Connect (authorization-code flow): the facility's broker
    (Keycloak for UmbrellaID, eduGAIN ...); the ID token is verified with the issuer's keys."""

    issuer: str | None = Field(None, description="e.g. https://auth.example.org/realms/users")
    client_id: str | None = None
    client_secret: SecretStr | None = Field(None, description="None: a public client (PKCE).")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    username_claim: str = Field("preferred_username", description="Claim naming the user.")
    groups_claim: str = Field(
        "groups", description="Claim listing the user's groups (mapped by proposal_groups)."
    )
    proposals_claim: str | None = Field(
        None, description="Claim listing the user's proposals directly, when the broker has one."
    )
    timeout_s: float = Field(10.0, gt=0)
    leeway_s: int = Field(60, ge=0, description="Clock skew allowed on the token's times.")


class AccessSettings(BaseModel):
    """Who may see and process which proposal (docs/security.md). Who someone is never
    comes from a setting: the Unix account on the command line, a sign-in on the web."""

    proposal_groups: list[str] = Field(
        default_factory=list,
        description="Group name patterns that make a member of a proposal, '{proposal}' "
        "standing for its id: ['{proposal}'] when groups are named ma1234. Empty (one "
        "machine): a Unix account's proposals are the proposal folders it owns.",
    )
    proposal_id: str = Field(
        r"[A-Za-z]{1,8}-?[A-Za-z]{0,4}[0-9]{1,8}",
        description="What a proposal id looks like (regular expression), so that groups "
        "like 'users' are never taken for proposals.",
    )
    staff_groups: list[str] = Field(
        default_factory=list, description="Members of these groups see every proposal."
    )
    shared_paths: list[Path] = Field(
        default_factory=list,
        description="Folders any run may read parameter files from, read-only (beamline "
        "calibrations); outputs never go there.",
    )
    ldap: LdapSettings = Field(default_factory=LdapSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)


class PortalSettings(BaseModel):
    """``calypso portal``: the web portal where visiting users sign in, browse and plot
    their data and follow, launch and export their runs (docs/portal.md)."""

    host: str = Field(
        "127.0.0.1",
        description="Address it listens on: loopback, behind a TLS reverse proxy "
        "(0.0.0.0 only behind one: session cookies and passwords cross the network).",
    )
    port: int = Field(8400, ge=1, le=65535)
    public_url: str | None = Field(
        None,
        description="The portal's address as browsers reach it (https://portal.example.org): "
        "OpenID Connect's redirect address and links in run artifacts. Unset: "
        "http://<host>:<port>.",
    )
    session_max_age_h: float = Field(
        12.0, gt=0, description="A sign-in lasts this long, then the user signs in again."
    )
    secure_cookies: bool = Field(
        False,
        description="Send the session cookie over HTTPS only (set it behind a TLS proxy).",
    )


class UserFlowSettings(BaseModel):
    """Bounds on user flow specifications, checked at ``flows check``, ``save`` and ``run``:
    a mistyped sweep or a hostile file is refused with a message instead of taking the
    memory of the machine that reads or runs it."""

    max_variants: int = Field(
        1000,
        ge=1,
        description="Variants a flow's sweeps may make at most (the product of every swept "
        "parameter's number of values).",
    )
    max_document_bytes: int = Field(
        256 * 1024, ge=1024, description="Size of a specification at most (bytes)."
    )
    max_list_items: int = Field(
        10_000, ge=1, description="Items of any one list in a specification at most."
    )
    max_string_chars: int = Field(
        4096, ge=1, description="Characters of any one string in a specification at most."
    )


class ServerSettings(BaseModel):
    """The local Prefect server started by ``calypso server``."""

    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    local_keep_s: float = Field(
        1800.0,
        ge=0,
        description="With no Prefect server configured, the first `calypso run` starts one "
        "on loopback and later commands with this home use it; it stops once unused for "
        "this long (s). 0: a temporary server for each command instead.",
    )
