"""How the CLI sets up Prefect and Dask before they are imported.

Defaults only (``os.environ.setdefault``): anything a user sets wins.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.util import find_spec

from calypso.errors import ConfigurationError
from calypso.settings import CalypsoSettings


def prepare_environment(settings: CalypsoSettings, verbose: bool = False) -> None:
    """Quiet, offline-friendly defaults for Prefect and Dask in this process and its children."""
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    defaults = {
        # No telemetry from a beamline machine (and no noise when offline).
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's client reads only this one (3.x prints a telemetry banner on first use).
        "DO_NOT_TRACK": "1",
        # The terminal shows Calypso's own summary; the full logs go to the
        # Prefect API (UI) at INFO whatever the console shows.
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO" if verbose else "CRITICAL",
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO" if verbose else "ERROR",
        "PREFECT_LOGGING_INTERNAL_LEVEL": "ERROR",
        "DASK_LOGGING__DISTRIBUTED": "info" if verbose else "error",
        "DASK_DISTRIBUTED__ADMIN__LOG_LENGTH": "1000",
        # The local cluster's nannies write the workers' environment into this
        # process too; numba must see the same thread count from the start.
        "NUMBA_NUM_THREADS": str(settings.executor.threads_per_worker),
        # Chunk results a retried run reuses (tasks/caching.py); workers inherit it.
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.result_storage),
    }
    if find_spec("pyopencl") is None:
        # silx warns at import when pyopencl is absent; without it OpenCL is off anyway.
        defaults["SILX_OPENCL"] = "0"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    if not verbose:
        # The STOMP client logs every failed connection attempt; an unreachable
        # broker is reported once, as a warning about the outbox.
        logging.getLogger("stompest").setLevel(logging.CRITICAL)


def check_prefect_api(timeout_s: float = 10.0) -> None:
    """Fail early, with a message, when PREFECT_API_URL names a server that does not answer."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigurationError(
        f"the Prefect API at {url} does not answer ({problem}): start it (`calypso server`) "
        "or unset PREFECT_API_URL to run with Prefect's ephemeral server"
    )


@contextmanager
def prefect_api() -> Iterator[str]:
    """Make sure a Prefect API serves this process *and* its Dask workers.

    With ``PREFECT_API_URL`` set, that server is used. Otherwise this starts
    Prefect's ephemeral (temporary, SQLite) server once and points this process
    and every worker it spawns at it; left alone, each Dask worker process
    would start a temporary server of its own.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    # A first start creates and migrates the SQLite database: allow more than
    # Prefect's default 20 s on a busy two-core machine.
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        drain_prefect_queues()
        del os.environ["PREFECT_API_URL"]
        server.stop()


def drain_prefect_queues() -> None:
    """Send queued logs and events before the temporary server goes away.

    Otherwise Prefect tries to deliver them at interpreter exit to a server
    that no longer exists, printing errors and retrying for a minute.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with suppress(Exception):  # best effort: the results are already written
            service.drain_all(timeout=10, at_exit=False)
