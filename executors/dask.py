"""Turn settings into a Prefect task runner backed by Dask.

``local`` (default) starts a :class:`distributed.LocalCluster` with one
single-threaded worker process per core for the duration of a flow run:
pyFAI, h5py and most reduction code hold the GIL or use their own threads, so
processes scale and threads do not. ``address`` uses an existing scheduler.
"""

from __future__ import annotations

import os
from typing import Any

import dask
from distributed import LocalCluster
from prefect_dask import DaskTaskRunner

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
        "MALLOC_MMAP_THRESHOLD_": 1 << 30,
        "MALLOC_TRIM_THRESHOLD_": 1 << 30,
    }


def start_local_cluster(**kwargs: Any) -> LocalCluster:
    """A LocalCluster whose worker processes get :func:`worker_environment`."""
    environment = worker_environment(kwargs.get("threads_per_worker") or 1)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environment}):
        return LocalCluster(**kwargs)


def build_task_runner(executor: ExecutorSettings) -> DaskTaskRunner:
    """The Prefect task runner for these executor settings."""
    if executor.kind == "address":
        if not executor.address:
            raise ConfigurationError(
                "executor kind 'address' needs CALYPSO_EXECUTOR__ADDRESS=tcp://host:8786"
            )
        return DaskTaskRunner(address=executor.address)
    return DaskTaskRunner(
        cluster_class=start_local_cluster,
        cluster_kwargs={
            "n_workers": local_worker_count(executor),
            "threads_per_worker": executor.threads_per_worker,
            "processes": True,
            "memory_limit": executor.memory_limit,
            "dashboard_address": None,
        },
    )
