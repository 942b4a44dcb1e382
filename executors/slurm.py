"""Dask workers as SLURM jobs (dask-jobqueue), one adaptive cluster per flow run.

The scheduler runs in the process that runs the flow (login or service node);
each SLURM job runs ``processes`` Dask workers with the technique's code
preloaded and the same per-worker environment as local workers. Workers retire
``lifetime`` after they start, before SLURM's walltime kills them, so no task
dies with its job; the adaptive cluster submits replacements as needed.

Closed like the local cluster: TLS with Calypso's certificate, which the job script
names by path (``--tls-ca-file`` ...), so the nodes must read Calypso's home (a shared
file system, as for the data); the dashboard listens on the submitting node's loopback.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from calypso.settings import ExecutorSettings


def slurm_cluster_options(executor: ExecutorSettings) -> tuple[dict[str, Any], dict[str, int]]:
    """``SLURMCluster`` keyword arguments and the adaptive bounds, from the settings."""
    from calypso.executors.dask import DASHBOARD_ADDRESS, tls_options, worker_environment

    slurm = executor.slurm
    threads = max(1, slurm.cores // slurm.processes)
    environment = worker_environment(threads)
    prologue = [f"export {name}={value}" for name, value in environment.items()]
    worker_arguments = [f"--preload={module}" for module in executor.preload]
    if slurm.lifetime:
        worker_arguments += [f"--lifetime={slurm.lifetime}", "--lifetime-stagger=2m"]
    options: dict[str, Any] = {
        "queue": slurm.queue,
        "account": slurm.account,
        "cores": slurm.cores,
        "processes": slurm.processes,
        "memory": slurm.memory,
        "walltime": slurm.walltime,
        "job_name": slurm.job_name,
        "python": slurm.python or shlex.quote(sys.executable),
        "job_script_prologue": [*prologue, *slurm.prologue],
        "job_extra_directives": list(slurm.directives),
        "worker_extra_args": worker_arguments,
        "interface": slurm.interface,
        "log_directory": str(slurm.log_directory) if slurm.log_directory else None,
        # Any free port: several flow runs may each hold a scheduler on one node.
        "scheduler_options": {"dashboard_address": DASHBOARD_ADDRESS},
        **tls_options(executor),
    }
    bounds = {"minimum_jobs": slurm.minimum_jobs, "maximum_jobs": slurm.maximum_jobs}
    return {k: v for k, v in options.items() if v is not None}, bounds


def start_slurm_cluster(**options: Any):
    """The cluster, with Calypso's certificate read as it starts (``security=True``)."""
    from calypso.executors.dask import with_certificate

    return slurm_cluster_class()(**with_certificate(options))


def slurm_cluster_class() -> type:
    """dask-jobqueue's ``SLURMCluster``, imported without the Ctrl-C handler its import
    sets (:func:`~calypso.executors.interrupts.ctrl_c_handler_kept`)."""
    from calypso.executors.interrupts import ctrl_c_handler_kept

    with ctrl_c_handler_kept():
        from dask_jobqueue import SLURMCluster
    return SLURMCluster
