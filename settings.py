"""Calypso settings: ``CALYPSO_*`` environment variables and an optional TOML file.

Precedence (highest first): keyword arguments, environment variables
(``CALYPSO_EXECUTOR__N_WORKERS=4``; nested fields use ``__``), the TOML file
named by ``CALYPSO_CONFIG`` (default ``~/.config/calypso/config.toml`` when it
exists), then the embedded defaults, which run everything on one machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from calypso.errors import ConfigurationError

DEFAULT_CONFIG_FILE = Path("~/.config/calypso/config.toml").expanduser()
MIN_WORKER_MEMORY = 256 * 2**20  # bytes: less, and a Dask worker is killed while it starts


class ProcessedDataPolicy(BaseModel):
    """Where processed results go, relative to the raw dataset (ESRF data policy)."""

    raw_dirname: str = Field("RAW_DATA", description="Name of the raw data folder of a session.")
    processed_dirname: str = Field(
        "PROCESSED_DATA",
        description="Folder mirroring RAW_DATA for results (PROCESSED_DATA or NOBACKUP).",
    )
    technique_subdir: bool = Field(
        True,
        description="Write each technique's results in its own sub-folder of the processed "
        "dataset folder, so each is one ICAT processed dataset.",
    )


class SlurmSettings(BaseModel):
    """Dask workers as SLURM jobs (dask-jobqueue), adaptive between two bounds."""

    queue: str | None = Field(None, description="Partition (default: the cluster's default).")
    account: str | None = None
    cores: int = Field(1, ge=1, description="Cores per job.")
    processes: int = Field(1, ge=1, description="Dask worker processes per job.")
    memory: str = Field("4GB", description="Memory per job.")
    walltime: str = Field("01:00:00", description="Job time limit (HH:MM:SS).")
    lifetime: str | None = Field(
        "55m",
        description="Workers retire (their tasks moved) this long after they start, before "
        "SLURM kills the job at its walltime; the adaptive cluster replaces them.",
    )
    minimum_jobs: int = Field(0, ge=0)
    maximum_jobs: int = Field(4, ge=1)
    job_name: str = Field("calypso", description="Job name prefix (as sacct shows it).")
    python: str | None = Field(
        None, description="Python on the nodes (default: this one: shared software area)."
    )
    prologue: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the worker starts (module load ..., source ...).",
    )
    directives: list[str] = Field(
        default_factory=list, description="Extra #SBATCH lines, e.g. '--constraint=skylake'."
    )
    interface: str | None = Field(
        None, description="Network interface the scheduler and workers use (e.g. ib0)."
    )
    log_directory: Path | None = Field(None, description="Where the jobs' output goes.")


class OpenStackSettings(BaseModel):
    """A long-lived Dask cluster on OpenStack VMs (dask-cloudprovider), started by
    ``calypso cluster up openstack`` and used by address."""

    auth_url: str | None = None
    region: str | None = None
    application_credential_id: str | None = None
    application_credential_secret: SecretStr | None = None
    flavor: str = Field("m1.large", description="VM size of the scheduler and workers.")
    image: str = Field("ubuntu-24.04", description="VM image with Docker.")
    docker_image: str = Field(
        "registry.example.org/calypso:latest", description="Calypso's image (deploy/)."
    )
    network_id: str | None = None
    keypair_name: str | None = None
    security_group: str = "default"
    external_network_id: str | None = None
    create_floating_ip: bool = False
    minimum_workers: int = Field(0, ge=0)
    maximum_workers: int = Field(8, ge=1)
    worker_threads: int = Field(1, ge=1)


class ExecutorSettings(BaseModel):
    """Which Dask cluster runs the tasks."""

    kind: Literal["local", "address", "slurm", "openstack"] = Field(
        "local",
        description="'local': a Dask LocalCluster; 'address': an existing scheduler; "
        "'slurm': workers as SLURM jobs, per flow run; 'openstack': the cluster that "
        "`calypso cluster up openstack` keeps.",
    )
    n_workers: int | None = Field(
        None, ge=1, description="Worker processes of the local cluster (default: one per core)."
    )
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="Memory limit per local worker (Dask syntax).")
    address: str | None = Field(None, description="Scheduler address when kind = 'address'.")
    preload: list[str] = Field(
        default_factory=list,
        description="Modules workers import as they start (default: the chunk tasks of the "
        "technique being run, from its descriptor).",
    )
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    openstack: OpenStackSettings = Field(default_factory=OpenStackSettings)

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _dask_memory_limit(cls, value: object) -> str:
        """What Dask accepts (checked here: Dask itself fails with a traceback while the
        cluster starts): 'auto', a fraction of the machine's memory (0-1; 0: no limit), or
        a size ('4GB', '3.5 GiB', bytes) of at least 256 MiB, below which a worker is
        killed as soon as it has imported the science."""
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
        try:
            number = float(text)
        except ValueError:
            from dask.utils import parse_bytes

            try:
                number = float(parse_bytes(text))
            except ValueError:
                number = math.nan
        if not math.isfinite(number) or number < 0 or 1 < number < MIN_WORKER_MEMORY:
            raise ValueError(
                f"{text!r} is not a worker memory limit: give 'auto', a fraction of the "
                "machine's memory between 0 and 1 (0: no limit) or a size of at least 256 MiB "
                "such as '4GB' or '3.5GiB'"
            )
        return text


class IcatSettings(BaseModel):
    """The facility catalogue, reached through pyicat-plus (STOMP to ActiveMQ)."""

    metadata_urls: list[str] = Field(
        default_factory=list, description="STOMP brokers the ICAT ingester reads, as host:port."
    )
    metadata_queue: str = Field("icatIngest", description="Queue of the dataset ingester.")
    queue_monitor_port: int | None = Field(
        None, description="ActiveMQ REST (Jolokia) port, to check that the queue is consumed."
    )
    icatplus_url: str | None = Field(
        None, description="ICAT+ REST server: checks that the proposal has an investigation."
    )
    icatplus_token: SecretStr | None = Field(None, description="ICAT+ data-acquisition API key.")
    timeout_s: float = Field(5.0, gt=0, description="Connection timeout.")
    portal_url: str | None = Field(
        None, description="Prefect UI base URL, to link each dataset to its flow run."
    )


class CatalogueSettings(BaseModel):
    """Where processed datasets are registered."""

    backend: Literal["sqlite", "icat"] = Field(
        "sqlite",
        description="'sqlite': the embedded catalogue only; 'icat': also ICAT, with the "
        "SQLite catalogue as record and outbox.",
    )
    path: Path | None = Field(
        None,
        description="SQLite file of the embedded catalogue (default: <home>/catalogue.sqlite).",
    )
    lease_s: float = Field(
        120.0,
        gt=0,
        description="A flow run holds its acquisition's processing claim and its reserved "
        "record for this long, renewed every quarter of it while it runs: a run killed or "
        "vanished releases them this long after its last heartbeat.",
    )
    icat: IcatSettings = Field(default_factory=IcatSettings)


class ExportSettings(BaseModel):
    """Where ``calypso export`` (and a flow's ``export_to``) sends processed datasets.

    Credentials come, in this order, from ``credentials_block`` (a Prefect Secret
    block holding ``{"access_key_id": ..., "secret_access_key": ...}``), from
    ``access_key_id``/``secret_access_key`` here, or from the standard AWS chain
    (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, ``~/.aws``) when neither is set.
    """

    default_target: str | None = Field(
        None,
        description="Target used when none is given (default: the folder <home>/export).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint of a non-AWS store (Ceph RGW, MinIO, ...), e.g. "
        "https://s3.example.org.",
    )
    region: str | None = Field(None, description="S3 region (default: the AWS chain's).")
    profile: str | None = Field(None, description="AWS profile name in ~/.aws.")
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    credentials_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the S3 key pair (JSON)."
    )
    part_size_mb: int = Field(
        16,
        ge=5,
        le=5120,
        description="Multipart part size (S3 needs >= 5 MB; raised for files over 10,000 "
        "parts). Memory held is about files_at_once x parts_at_once x part size.",
    )
    files_at_once: int = Field(8, ge=1, le=64, description="Files uploaded concurrently.")
    parts_at_once: int = Field(4, ge=1, le=64, description="Parts of one file in flight.")
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(
        3, ge=1, le=10, description="Attempts for a failing request before the export stops."
    )
    icat_field: str = Field(
        "Notes_note_01",
        description="ICAT dataset parameter that receives the exported URIs (ICAT backend).",
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


class WatchSettings(BaseModel):
    """``calypso watch``: how RAW_DATA trees are followed and scans routed to flows."""

    interval_s: float = Field(10.0, gt=0, description="Seconds between two polls of a tree.")
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
        "(default: <home>/results).",
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


class CalypsoSettings(BaseSettings):
    """All of Calypso's configuration. Every field has an embedded default."""

    model_config = SettingsConfigDict(
        env_prefix="CALYPSO_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(
        Path("~/.calypso").expanduser(),
        description="Folder for Calypso's own state (catalogue, logs).",
    )
    path_map: dict[str, str] = Field(
        default_factory=dict,
        description="Facility path prefix -> where workers see it, e.g. "
        '{"/data/visitor": "/mnt/gpfs/visitor"}: a flow submitted with facility paths reads '
        "the same files on workers that mount them elsewhere.",
    )
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Mount points of the facility data (e.g. /data/visitor): every run stays "
        "inside the proposals of who asked; serve and watch refuse to start without them. "
        "Unset: one machine, the Unix account's own permissions decide (docs/security.md).",
    )
    processed_data: ProcessedDataPolicy = Field(default_factory=ProcessedDataPolicy)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    catalogue: CatalogueSettings = Field(default_factory=CatalogueSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    user_flows: UserFlowSettings = Field(default_factory=UserFlowSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    prefect_api_url: str | None = Field(
        None,
        description="Prefect server API; when unset, PREFECT_API_URL or Prefect's "
        "ephemeral mode is used.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_file_path()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def catalogue_path(self) -> Path:
        return self.catalogue.path or self.home / "catalogue.sqlite"

    @property
    def watch_state_path(self) -> Path:
        return self.watch.state_path or self.home / "watch.sqlite"

    @property
    def result_storage(self) -> Path:
        return self.serve.result_storage or self.home / "results"

    @property
    def export_target(self) -> str:
        return self.export.default_target or str(self.home / "export")


def config_file_path() -> Path | None:
    """The TOML configuration file in use, or None."""
    named = os.environ.get("CALYPSO_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigurationError(
                f"CALYPSO_CONFIG names {path}, which is not a file: create it or unset the variable"
            )
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(**overrides: object) -> CalypsoSettings:
    """Read the settings, turning validation problems into one actionable message; unknown
    ``CALYPSO_*`` variables and configuration keys are refused, naming the closest valid one."""
    from calypso.setting_names import check_setting_names

    check_setting_names(CalypsoSettings, config_file_path())
    try:
        return CalypsoSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        source = config_file_path()
        where = (
            f" (config file {source} or CALYPSO_* variables)"
            if source
            else " (CALYPSO_* variables)"
        )
        raise ConfigurationError(f"invalid Calypso settings{where}: {problems}") from None
    except ValueError as exc:  # malformed TOML
        raise ConfigurationError(f"cannot read the Calypso configuration: {exc}") from None
