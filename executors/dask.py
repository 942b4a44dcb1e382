"""Turn settings into a Prefect task runner backed by Dask.

``local`` (default) starts a :class:`distributed.LocalCluster` with one
single-threaded worker process per core for the duration of a flow run: processes
scale whatever the code, threads only where it releases the GIL and keeps no state a
thread could trample. A technique whose chunk tasks do (diffraction: pyFAI's kernels,
integrators lent per thread) gets, in a command's own cluster, one worker of as many
threads in the command's process instead (:func:`local_cluster_options`). ``address``
uses an existing scheduler.

Every cluster is closed to processes without Calypso's certificate (``executors/tls.py``:
TLS between client, scheduler and workers) and its dashboard listens on loopback only.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import ConfigurationError
from calypso.executors.tls import calypso_security, cluster_security, require_tls_address
from calypso.executors.worker_setup import LOCAL_CORES
from calypso.settings import ExecutorSettings

if TYPE_CHECKING:
    from distributed import LocalCluster, Security

# Any free port (a fixed one warns when another cluster holds it), on loopback: the
# dashboard shows every task's arguments and takes no certificate. Reach it by SSH tunnel.
DASHBOARD_ADDRESS = "127.0.0.1:0"

logger = logging.getLogger(__name__)


def local_worker_count(executor: ExecutorSettings) -> int:
    """Worker processes a local cluster gets: the setting, else one per usable core."""
    if executor.n_workers:
        return executor.n_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // executor.threads_per_worker)


def worker_environment(threads_per_worker: int, local_cores: int = 0) -> dict[str, int]:
    """Environment of local worker processes, set before they start.

    Besides one OpenMP/BLAS thread per Dask thread, glibc is told to keep freed
    memory in the heap: reduction code allocates several frame-sized
    temporaries per frame, and Dask's default (``MALLOC_TRIM_THRESHOLD_=65536``)
    returns them to the OS each time, so every frame paid tens of thousands of
    page faults (measured: ~40,000 per 10 Pilatus 1M frames, ~25% of the time).
    ``local_cores``: the cores of a local cluster's workers, which its chunk tasks share
    out across the worker processes (:func:`calypso.executors.worker_setup.openmp_share`).
    """
    threads = threads_per_worker
    environment = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "NUMEXPR_NUM_THREADS": threads,
        "NUMBA_NUM_THREADS": threads,
        "MALLOC_MMAP_THRESHOLD_": 1 << 30,
        "MALLOC_TRIM_THRESHOLD_": 1 << 30,
    }
    if local_cores > threads:
        environment[LOCAL_CORES] = local_cores
    return environment


def _local_environment(options: dict[str, Any]) -> dict[str, int]:
    """:func:`worker_environment` of a local cluster with these options."""
    threads = options.get("threads_per_worker") or 1
    processes = options.get("processes", True)
    cores = threads * (options.get("n_workers") or 1) if processes else 0
    return worker_environment(threads, cores)


def start_local_cluster(*, forked: bool = False, **kwargs: Any) -> LocalCluster:
    """A LocalCluster whose worker processes get :func:`worker_environment`, with Calypso's
    certificate when ``security`` is True (read here, as the cluster starts, not when the
    options are made: a flow's options are made when its module is imported).

    ``forked``: its workers are forked from this process's fork server (given to them by
    :func:`fork_workers`); else each starts afresh and imports their code.
    """
    import dask
    from distributed import LocalCluster

    from calypso.executors.interrupts import ctrl_c_left_to_this_process

    environment = _local_environment(kwargs)
    kwargs = with_certificate(kwargs)
    config: dict[str, Any] = {"distributed.nanny.pre-spawn-environ": environment}
    if forked:
        config["distributed.worker.multiprocessing-method"] = "forkserver"
    # Its workers (and their fork server) leave Ctrl-C to the command, which closes them.
    processes = kwargs.get("processes", True)
    with dask.config.set(config), ctrl_c_left_to_this_process(multiprocessing=processes):
        return LocalCluster(**kwargs)


def fork_workers(options: dict[str, Any]) -> bool:
    """Whether the workers of a local cluster with these options can be forked from this
    process's fork server, which then imports their code once for all of them
    (:mod:`calypso.executors.fork_server`): a cold run's workers start ~1 s sooner on two
    cores, where each would otherwise import Prefect, Dask and pyFAI while the command and
    Prefect's server start too. False where the fork server is another's (different
    settings in the same process): the workers start afresh."""
    from calypso.executors.fork_server import fork_server_for

    modules = ["distributed.nanny", "distributed.worker", *options.get("preload", [])]
    # The variables a worker needs as it starts (OpenMP's, malloc's) are the fork server's:
    # the nanny sets them in this process before its first worker, so before the fork
    # server starts, as it does before each spawn.
    environment = _local_environment(options)
    if not fork_server_for(modules, environment):
        return False
    import distributed.utils

    # Dask otherwise gives the fork server a list of its own (importing it here first).
    distributed.utils._forkserver_preload_set = True
    return True


def with_certificate(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``security=True`` replaced by Calypso's certificate."""
    if options.get("security") is True:
        return options | {"security": calypso_security()}
    return options


def local_cluster_options(executor: ExecutorSettings, threaded: bool = False) -> dict[str, Any]:
    """A local cluster's options: one worker process per core (:func:`local_worker_count`)
    or, ``threaded``, one worker in the calling process with as many threads.

    Threads are for a command's own cluster, of a technique whose chunk tasks release the
    GIL and borrow their caches per thread (its descriptor's ``threaded_chunks``): there is
    no process to start, no code to import again and one fewer process on the machine's
    cores while Prefect's server and the command start (600 frames cold on two cores:
    22.5-26.6 s against ~30 s with two worker processes).
    """
    workers = local_worker_count(executor)
    options = {
        "n_workers": workers,
        "threads_per_worker": executor.threads_per_worker,
        "processes": True,
        "memory_limit": executor.memory_limit,
        "dashboard_address": DASHBOARD_ADDRESS,
        # Workers import the reduction code while they start, not on their first task.
        "preload": [*executor.preload, "calypso.executors.worker_setup"],
        **tls_options(executor),
    }
    if threaded:
        from distributed.system import MEMORY_LIMIT
        from distributed.worker_memory import parse_memory_limit

        # The setting is per worker process (as Dask reads it); the one worker has all of
        # their memory, within the machine's.
        each = parse_memory_limit(executor.memory_limit, executor.threads_per_worker, logger=logger)
        memory = 0 if each is None else min(each * workers, MEMORY_LIMIT)
        threads = workers * executor.threads_per_worker
        options |= {"n_workers": 1, "threads_per_worker": threads, "processes": False}
        options["memory_limit"] = memory
        # Scheduler, worker and client are this process's: they talk in memory, through
        # no port another process could reach (so with no certificate), and tasks and
        # results are handed over, not serialised.
        options.pop("security", None)
        options["protocol"] = "inproc://"
        # The worker's HTTP server (health, metrics) would listen on every interface.
        options["worker_dashboard_address"] = DASHBOARD_ADDRESS
    return options


def tls_options(executor: ExecutorSettings) -> dict[str, Any]:
    """A cluster's ``security`` (True: Calypso's certificate, read as it starts) and
    ``protocol``, when the settings ask for TLS."""
    return {"security": True, "protocol": "tls://"} if executor.tls else {}


def boot_local_cluster(
    executor: ExecutorSettings, threaded: bool = False
) -> Future[LocalCluster] | None:
    """Start the local cluster in a background thread (None unless kind is 'local'):
    ``threaded`` (the technique's chunks can, and ``executor.local_threads``), one worker
    of threads in this process (see :func:`local_cluster_options`).

    The workers start and import the reduction code while the caller imports
    Prefect and prepares the run, instead of after it.
    """
    if executor.kind != "local":
        return None
    # The certificate read (made, the first time) here: a problem is a message, not a
    # traceback from the thread.
    threaded = in_threads(executor, threaded)
    options = with_certificate(local_cluster_options(executor, threaded))
    if threaded:
        from calypso.executors.worker_setup import share_cores

        share_cores(options["threads_per_worker"])
        return _in_background(lambda: start_local_cluster(**options))
    forked = fork_workers(options)  # in the caller's thread: its environment, as it is now
    return _in_background(lambda: start_local_cluster(forked=forked, **options))


def in_threads(executor: ExecutorSettings, threaded: bool) -> bool:
    """Whether a command's own local cluster, for a technique whose chunks can run in
    threads (``threaded``), is one worker of threads in the command's process."""
    return threaded and executor.local_threads


def _in_background(call: Any) -> Future:
    """``call()`` in a thread of its own, as a future (the caller goes on meanwhile)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calypso-cluster")
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def keeps_cluster(executor: ExecutorSettings, api_is_kept: bool) -> bool:
    """Whether a command's local cluster is the kept one (:mod:`calypso.executors.kept`):
    only for a Prefect API that outlives the command, which its workers' logs go to."""
    return executor.kind == "local" and executor.local_keep_s > 0 and api_is_kept


def boot_kept_cluster(
    executor: ExecutorSettings, home: Path, api_url: str, api_secret: str | None
) -> Future:
    """Find, or start, the home's kept local cluster for these settings and the Prefect
    API at ``api_url`` (:mod:`calypso.executors.kept`) in a background thread; the future
    gives what :func:`kept_task_runner` takes."""
    from calypso.executors.kept import cluster_key, kept_cluster

    options = local_cluster_options(executor)
    key = cluster_key(options, api_url)
    api, keep_s = (api_url, api_secret), executor.local_keep_s
    return _in_background(lambda: (kept_cluster(home, key, options, keep_s, api), key))


def kept_cluster_runs(executor: ExecutorSettings, home: Path, api_url: str) -> bool:
    """Whether the home's kept local cluster for these settings and this Prefect API runs
    (finding it counts as using it)."""
    from calypso.executors.kept import cluster_key, find_cluster

    return find_cluster(home, cluster_key(local_cluster_options(executor), api_url)) is not None


def kept_task_runner(executor: ExecutorSettings, home: Path, booted: Future):
    """The task runner on the kept cluster ``booted`` (:func:`boot_kept_cluster`), and
    what to call when the command is done with it."""
    from prefect_dask import DaskTaskRunner

    from calypso.executors.kept import release

    address, key = booted.result()
    security = cluster_security(executor, home)
    runner = DaskTaskRunner(address=address, client_kwargs=_client(security))
    return runner, lambda: release(home, key)


def build_task_runner(executor: ExecutorSettings, cluster: LocalCluster | None = None):
    """The Prefect task runner (a ``DaskTaskRunner``) for these executor settings.

    With ``cluster``, the runner uses that cluster and leaves closing it to the
    caller; otherwise a local cluster lives as long as the flow run. Its Dask client
    presents the cluster's certificate.
    """
    from prefect_dask import DaskTaskRunner

    if cluster is not None:  # by address: Prefect copies task runners, and copies drop a cluster
        return DaskTaskRunner(
            address=cluster.scheduler_address, client_kwargs=_client(cluster.security)
        )
    if executor.kind == "address":
        if not executor.address:
            raise ConfigurationError(
                "executor kind 'address' needs CALYPSO_EXECUTOR__ADDRESS=tls://host:8786"
            )
        security = cluster_security(executor)
        address = require_tls_address(executor.address, security)
        return DaskTaskRunner(address=address, client_kwargs=_client(security))
    if executor.kind == "slurm":
        from calypso.executors.slurm import slurm_cluster_options, start_slurm_cluster

        options, bounds = slurm_cluster_options(executor)
        return DaskTaskRunner(
            cluster_class=start_slurm_cluster, cluster_kwargs=options, adapt_kwargs=bounds
        )
    if executor.kind == "openstack":
        from calypso.executors.openstack import running_cluster_address, running_cluster_security

        security = running_cluster_security() if executor.tls else None
        address = require_tls_address(running_cluster_address(), security)
        return DaskTaskRunner(address=address, client_kwargs=_client(security))
    return DaskTaskRunner(
        cluster_class=start_local_cluster, cluster_kwargs=local_cluster_options(executor)
    )


def require_scheduler(executor: ExecutorSettings, timeout: float = 5.0) -> None:
    """A ConfigurationError unless the scheduler ``executor`` names by address answers on
    its port (Dask's own client tries for 30 s, then ends the run in a traceback), or, for
    SLURM, its controller answers ``scontrol ping`` (dask-jobqueue tries ``sbatch`` again
    every few seconds, for good, without a word). Nothing for the other kinds."""
    import socket
    from urllib.parse import urlsplit

    if executor.kind == "slurm":
        _require_slurm_controller(timeout * 2)
        return
    if executor.kind != "address" or not executor.address:
        return
    where = urlsplit(executor.address if "://" in executor.address else f"tcp://{executor.address}")
    try:
        with socket.create_connection((where.hostname or "", where.port or 8786), timeout):
            return
    except OSError as exc:
        raise ConfigurationError(
            f"the Dask scheduler at {executor.address} (CALYPSO_EXECUTOR__ADDRESS) does not "
            f"answer ({exc.strerror or exc}): start it, or unset CALYPSO_EXECUTOR__KIND to "
            "run on this machine's own workers"
        ) from None


def _require_slurm_controller(timeout: float) -> None:
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return  # no SLURM client here: sbatch's own error says so
    try:
        ping = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        ping = None
    if ping is None or ping.returncode != 0:
        said = ping.stdout.strip().splitlines()[0] if ping and ping.stdout.strip() else "no answer"
        raise ConfigurationError(
            f"the SLURM controller does not answer (scontrol ping: {said}): start slurmctld, "
            "or unset CALYPSO_EXECUTOR__KIND to run on this machine's own workers"
        )


def _client(security: Security | None) -> dict[str, Any]:
    """The Dask client's keyword arguments: the certificate, when the cluster has one. A
    client of a cluster object gets it from the cluster; by address, it must be given."""
    return {"security": security} if security else {}


def worker_identity() -> str:
    """Where a task runs: ``slurm:<job id>`` in a SLURM job, else ``<host>:<pid>``."""
    import socket

    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}" if job else f"{socket.gethostname()}:{os.getpid()}"
