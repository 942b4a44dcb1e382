"""Turn settings into a Prefect task runner backed by Dask.

``local`` (default) starts a :class:`distributed.LocalCluster` with one
single-threaded worker process per core for the duration of a flow run:
pyFAI, h5py and most reduction code hold the GIL or use their own threads, so
processes scale and threads do not. ``address`` uses an existing scheduler.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dask
from distributed import LocalCluster

from calypso.errors import ConfigurationError
from calypso.settings import ExecutorSettings


def local_worker_count(executor: ExecutorSettings) -> int:
    """Worker processes a local cluster gets: the setting, else one per usable core."""
    if executor.n_workers:
        return executor.n_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // executor.threads_per_worker)


def worker_environment(threads_per_worker: int) -> dict[str, int]:
    """Environment of local worker processes, set before they start.

    Besides one OpenMP/BLAS thread per Dask thread, glibc is told to keep freed
    memory in the heap: reduction code allocates several frame-sized
    temporaries per frame, and Dask's default (``MALLOC_TRIM_THRESHOLD_=65536``)
    returns them to the OS each time, so every frame paid tens of thousands of
    page faults (measured: ~40,000 per 10 Pilatus 1M frames, ~25% of the time).
    """
    threads = threads_per_worker
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "NUMEXPR_NUM_THREADS": threads,
        "NUMBA_NUM_THREADS": threads,
        "MALLOC_MMAP_THRESHOLD_": 1 << 30,
        "MALLOC_TRIM_THRESHOLD_": 1 << 30,
    }


def start_local_cluster(**kwargs: Any) -> LocalCluster:
    """A LocalCluster whose worker processes get :func:`worker_environment`."""
    environment = worker_environment(kwargs.get("threads_per_worker") or 1)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environment}):
        return LocalCluster(**kwargs)


def local_cluster_options(executor: ExecutorSettings) -> dict[str, Any]:
    return {
        "n_workers": local_worker_count(executor),
        "threads_per_worker": executor.threads_per_worker,
        "processes": True,
        "memory_limit": executor.memory_limit,
        # Any free port: a fixed one warns when another cluster already holds it.
        "dashboard_address": ":0",
        # Workers import the reduction code while they start, not on their first task.
        "preload": list(executor.preload),
    }


def boot_local_cluster(executor: ExecutorSettings) -> Future[LocalCluster] | None:
    """Start the local cluster in a background thread (None unless kind is 'local').

    The workers start and import the reduction code while the caller imports
    Prefect and prepares the run, instead of after it.
    """
    if executor.kind != "local":
        return None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calypso-cluster")
    future = pool.submit(start_local_cluster, **local_cluster_options(executor))
    pool.shutdown(wait=False)
    return future


def build_task_runner(executor: ExecutorSettings, cluster: LocalCluster | None = None):
    """The Prefect task runner (a ``DaskTaskRunner``) for these executor settings.

    With ``cluster``, the runner uses that cluster and leaves closing it to the
    caller; otherwise a local cluster lives as long as the flow run.
    """
    from prefect_dask import DaskTaskRunner

    if cluster is not None:  # by address: Prefect copies task runners, and copies drop a cluster
        return DaskTaskRunner(address=cluster.scheduler_address)
    if executor.kind == "address":
        if not executor.address:
            raise ConfigurationError(
                "executor kind 'address' needs CALYPSO_EXECUTOR__ADDRESS=tcp://host:8786"
            )
        return DaskTaskRunner(address=executor.address)
    if executor.kind == "slurm":
        from calypso.executors.slurm import slurm_cluster_options, start_slurm_cluster

        options, bounds = slurm_cluster_options(executor)
        return DaskTaskRunner(
            cluster_class=start_slurm_cluster, cluster_kwargs=options, adapt_kwargs=bounds
        )
    if executor.kind == "openstack":
        from calypso.executors.openstack import running_cluster_address

        return DaskTaskRunner(address=running_cluster_address())
    return DaskTaskRunner(
        cluster_class=start_local_cluster, cluster_kwargs=local_cluster_options(executor)
    )


def flow_task_runner(preload: list[str] | None = None):
    """The task runner a flow gets when no caller chooses one: runs started by a
    deployment (``calypso serve``), where Prefect loads the flow itself. Local workers
    import ``preload`` (the technique's chunk tasks) as they start, unless the settings
    name modules of their own.

    Read from the settings when the flow is made: ``calypso serve`` points its flow runs
    at the cluster it keeps (``CALYPSO_EXECUTOR__KIND=address``).
    """
    from calypso.settings import ExecutorSettings, load_settings

    executor = load_settings().executor
    if preload and executor.preload == ExecutorSettings().preload:
        executor = executor.model_copy(update={"preload": preload})
    return build_task_runner(executor)


def worker_identity() -> str:
    """Where a task runs: ``slurm:<job id>`` in a SLURM job, else ``<host>:<pid>``."""
    import socket

    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}" if job else f"{socket.gethostname()}:{os.getpid()}"
