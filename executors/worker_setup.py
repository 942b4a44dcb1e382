"""What every worker of a local cluster runs as it starts (a Dask preload module).

A worker that is closing can still be sending its heartbeat: when the cluster closes,
the connection goes from under it and distributed logs the failure with a traceback on
the user's terminal after a run that went well. Such a record, from a worker already
closing, says nothing: it is dropped. The same failure from a running worker is kept.
Its Prefect clients share one TLS context (:func:`calypso.flows.runtime.
share_prefect_tls_context`).
"""

from __future__ import annotations

import logging
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

    logging.getLogger("distributed.worker").addFilter(ClosingWorkerHeartbeat(worker))
    share_prefect_tls_context()  # each task run's engine makes a Prefect client
