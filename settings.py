"""Calypso settings: ``CALYPSO_*`` environment variables and an optional TOML file.

Precedence (highest first): keyword arguments, environment variables
(``CALYPSO_EXECUTOR__N_WORKERS=4``; nested fields use ``__``), the TOML file
named by ``CALYPSO_CONFIG`` (default ``~/.config/calypso/config.toml`` when it
exists), then the embedded defaults, which run everything on one machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from calypso.cluster_settings import (  # noqa: F401 (sections, imported from here)
    ExecutorSettings,
    OpenStackSettings,
    SlurmSettings,
)
from calypso.config_file import DEFAULT_HOME, config_file_path
from calypso.errors import ConfigurationError
from calypso.service_settings import (  # noqa: F401 (sections, imported from here)
    AccessSettings,
    LdapSettings,
    OidcSettings,
    PortalSettings,
    ServerSettings,
    ServeSettings,
    UserFlowSettings,
    WatchRule,
    WatchSettings,
)


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
    file_mode: str = Field(
        "0640",
        description="Mode of result files (octal), whatever the umask; never world-writable.",
    )
    folder_mode: str = Field(
        "2750",
        description="Mode of the result folders Calypso makes (octal; 2: set-group-id, so "
        "what is added keeps the group); never world-writable.",
    )
    group: str | None = Field(
        None,
        description="Group of results (name or number). Unset: the group of the raw "
        "dataset's proposal folder (<root>/<proposal>).",
    )

    @field_validator("file_mode", "folder_mode", mode="before")
    @classmethod
    def _mode(cls, value: object, info: ValidationInfo) -> str:
        from calypso.tasks.writers.permissions import parse_mode

        return parse_mode(value, "file" if info.field_name == "file_mode" else "folder")


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
        None,
        description="ICAT+ REST server: checks that the proposal has an investigation, and "
        "receives the e-logbook posts.",
    )
    icatplus_token: SecretStr | None = Field(None, description="ICAT+ data-acquisition API key.")
    elogbook: bool = Field(
        True,
        description="Post each finished run's summary (and quick look) to its proposal's "
        "e-logbook through ICAT+ (needs icatplus_url and icatplus_token).",
    )
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
    block holding ``{"access_key_id": ..., "secret_access_key": ...}`` as JSON text,
    which Prefect's API masks: docs/security.md), from
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
        None, description="Name of a Prefect Secret block holding the S3 key pair (JSON text)."
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


class CalypsoSettings(BaseSettings):
    """All of Calypso's configuration. Every field has an embedded default."""

    model_config = SettingsConfigDict(
        env_prefix="CALYPSO_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(
        DEFAULT_HOME,
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

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        """A relative root would mean another folder to each process (serve, watch and the
        portal are started from different folders)."""
        for root in roots:
            if not root.expanduser().is_absolute():
                raise ValueError(f"data root {root} is not an absolute path (e.g. /data/visitor)")
        return [root.expanduser() for root in roots]

    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    catalogue: CatalogueSettings = Field(default_factory=CatalogueSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    user_flows: UserFlowSettings = Field(default_factory=UserFlowSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    portal: PortalSettings = Field(default_factory=PortalSettings)
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


def load_settings(**overrides: object) -> CalypsoSettings:
    """Read the settings, turning validation problems into one actionable message; unknown
    ``CALYPSO_*`` variables and configuration keys are refused, naming the closest valid one."""
    from calypso.registry.access.secrets import guard
    from calypso.setting_names import check_setting_names

    check_setting_names(CalypsoSettings, config_file_path())
    try:
        settings = CalypsoSettings(**overrides)
        guard(settings)  # its credentials never reach a log, an error or a traceback
        return settings
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        source = config_file_path()
        where = (
            f" (config file {source} or CALYPSO_* variables)"
            if source
            else " (CALYPSO_* variables)"
        )
        raise ConfigurationError(f"invalid Calypso settings{where}: {problems}") from None
    except ValueError as exc:  # malformed TOML, or a variable pydantic-settings cannot parse
        field = re.search(r'field "(\w+)" from source "EnvSettingsSource"', str(exc))
        if field:
            name = f"CALYPSO_{field.group(1).upper()}"
            raise ConfigurationError(
                f"cannot read the Calypso configuration: {name} (or one of {name}__*) is not "
                'valid JSON: a list is written ["/data/visitor"], a table {"id00": [...]}'
            ) from None
        raise ConfigurationError(f"cannot read the Calypso configuration: {exc}") from None
