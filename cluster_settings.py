"""The settings of the Dask clusters that run the tasks: a local cluster, a scheduler by
address, SLURM jobs (dask-jobqueue) and OpenStack VMs (dask-cloudprovider).

Sections of :class:`calypso.settings.CalypsoSettings` (kept here so that neither file
grows past what one reads at once); import them from :mod:`calypso.settings`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

MIN_WORKER_MEMORY = 256 * 2**20  # bytes: less, and a Dask worker is killed while it starts


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

    # Checked here, as the configuration is read: otherwise each would fail later, in a job
    # script SLURM refuses or in workers that never start (a lifetime of "1h50m" is not a
    # duration Dask reads), while the flow run waits for them.
    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        walltime_s(value)
        return value

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, value: str | None) -> str | None:
        from dask.utils import parse_timedelta

        if value is None:
            return None
        try:
            parse_timedelta(value)
        except (KeyError, ValueError):
            raise ValueError(
                f"lifetime {value!r} is not a duration Dask reads: give one number and "
                "one unit, such as '55m', '110m' or '2h'"
            ) from None
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        from dask.utils import parse_bytes

        try:
            parse_bytes(value)
        except ValueError:
            raise ValueError(
                f"memory {value!r} is not a size: give one such as '4GB' or '16GiB'"
            ) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSettings:
        from dask.utils import parse_bytes, parse_timedelta

        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(
                f"minimum_jobs {self.minimum_jobs} is more than maximum_jobs {self.maximum_jobs}"
            )
        if self.processes > self.cores:
            raise ValueError(
                f"processes {self.processes} is more than cores {self.cores}: each Dask "
                "worker process of a job needs a core of its own"
            )
        if parse_bytes(self.memory) < MIN_WORKER_MEMORY * self.processes:
            raise ValueError(
                f"memory {self.memory!r} gives each of the {self.processes} worker "
                "processes of a job less than 256 MiB: a worker is killed as it starts"
            )
        if self.lifetime and parse_timedelta(self.lifetime) >= walltime_s(self.walltime):
            raise ValueError(
                f"lifetime {self.lifetime!r} is not shorter than walltime "
                f"{self.walltime!r}: SLURM would kill the workers with their tasks before "
                "they retire; give a lifetime a few minutes shorter"
            )
        return self


def walltime_s(text: str) -> float:
    """Seconds of a SLURM time limit, in the forms ``sbatch --time`` takes: minutes,
    minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes and
    days-hours:minutes:seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ValueError(
            f"walltime {text!r} is not a SLURM time limit: give HH:MM:SS, such as "
            "'02:00:00', or D-HH:MM:SS"
        )
    days, first, second, third = match.groups()
    numbers = [int(first), int(second or 0), int(third or 0)]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = numbers
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # hours:minutes:seconds
        return (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]
    return numbers[0] * 60 + numbers[1]  # minutes[:seconds]


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

    @model_validator(mode="after")
    def _bounds(self) -> OpenStackSettings:
        if self.minimum_workers > self.maximum_workers:
            raise ValueError(
                f"minimum_workers {self.minimum_workers} is more than maximum_workers "
                f"{self.maximum_workers}"
            )
        return self


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
    local_keep_s: float = Field(
        600.0,
        ge=0,
        description="A local cluster is started by the first `calypso run` in the background "
        "and used by the next commands that would start the same one (same home, options, "
        "environment, code and Prefect server); it stops once unused for this long (s). "
        "0: a cluster for each command, closed as it ends.",
    )
    local_threads: bool = Field(
        True,
        description="A command's own local cluster (none kept), for a technique whose chunk "
        "tasks release the GIL (diffraction): one worker of as many threads in the command, "
        "with no worker process to start. False: worker processes, as for the others.",
    )
    address: str | None = Field(None, description="Scheduler address when kind = 'address'.")
    preload: list[str] = Field(
        default_factory=list,
        description="Modules workers import as they start (default: the chunk tasks of the "
        "technique being run, from its descriptor).",
    )
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    openstack: OpenStackSettings = Field(default_factory=OpenStackSettings)
    tls: bool = Field(
        True,
        description="Dask's traffic (client, scheduler, workers) over TLS with Calypso's "
        "certificate (<home>/tls/dask.pem, made on first use): a process without it is "
        "refused. False only to use an existing scheduler without TLS (kind 'address').",
    )

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
