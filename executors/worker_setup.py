"""What every worker of a local cluster runs as it starts (a Dask preload module).

A worker that is closing can still be sending its heartbeat: when the cluster closes,
the connection goes from under it and distributed logs the failure with a traceback on
the user's terminal after a run that went well. Such a record, from a worker already
closing, says nothing: it is dropped. The same failure from a running worker is kept.
Its Prefect clients share one TLS context (:func:`calypso.flows.runtime.
share_prefect_tls_context`).

:func:`openmp_threads_for_this_task` is for the tasks themselves: OpenMP kernels (pyFAI's)
in threads of a command's own cluster.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


class ClosingWorkerHeartbeat(logging.Filter):
    """Drops the heartbeat failure of a worker that is closing."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(HEARTBEAT_FAILED):
            return True
        from distributed.core import Status

        return self.worker.status not in {Status.closing, Status.closed, Status.closing_gracefully}


def dask_setup(worker: Any) -> None:
    from calypso.flows.runtime import share_prefect_tls_context

    worker._calypso_heartbeat_filter = ClosingWorkerHeartbeat(worker)
    logging.getLogger("distributed.worker").addFilter(worker._calypso_heartbeat_filter)
    share_prefect_tls_context()  # each task run's engine makes a Prefect client


def dask_teardown(worker: Any) -> None:
    # A worker of threads lives in a process that outlives it (a notebook's runs, each
    # with a cluster of its own): its filter goes with it.
    kept = getattr(worker, "_calypso_heartbeat_filter", None)
    if kept is not None:
        logging.getLogger("distributed.worker").removeFilter(kept)


_thread = threading.local()


def openmp_threads_for_this_task() -> None:
    """Give the OpenMP kernels this thread runs (pyFAI's) ``OMP_NUM_THREADS`` threads, or
    one: the cores are shared out by Dask's threads and processes, one task a core.

    A worker process has ``OMP_NUM_THREADS`` from its start (:func:`calypso.executors.dask.
    worker_environment`), and this changes nothing there. The threads of a command's own
    cluster (:func:`calypso.executors.dask.local_cluster_options`, ``threaded``) run in
    the command, whose OpenMP runtime started with one thread a core: every task would
    start that many (600 frames on two cores: 42-50 frames/s against 47-55 with one).
    OpenMP's thread count is the calling thread's own, so each task thread sets it, once.
    """
    if getattr(_thread, "openmp_set", False):
        return
    from threadpoolctl import ThreadpoolController

    threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    ThreadpoolController().select(user_api="openmp").limit(limits=threads)
    _thread.openmp_set = True
