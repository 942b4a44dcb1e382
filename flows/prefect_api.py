"""The Prefect API a command's run reports to, begun before the command reads its input.

With ``PREFECT_API_URL`` set, that server. Otherwise the home's local server
(:mod:`calypso.flows.local_server`, kept for the next commands), or, with
``server.local_keep_s = 0``, a temporary server of this command's own.

Starting a server is the slowest part of a command's start on a small machine: Prefect's
server imports ~3.5 s of Python before it answers. :func:`begin_prefect_api` therefore
starts it as a process of its own as soon as the command has its settings, *before* it
imports Prefect and Dask and reads and checks its input, and
:func:`prefect_api` waits for it only when the run needs it: the two overlap. Neither
imports Prefect's server in the command itself (Prefect's own ``SubprocessASGIServer``
does, ~3 s of the command's CPU for a class that runs ``uvicorn`` in a subprocess).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Protocol

from calypso.errors import ConfigurationError
from calypso.executors.kept import prefect_answers
from calypso.flows import prefect_server
from calypso.flows.runtime import (
    AUTH,
    SERVER_AUTH,
    hide_prefect_secret,
    prefect_api_secret,
    prefect_auth_string,
)
from calypso.settings import CalypsoSettings, load_settings

START_TIMEOUT_S = 120.0  # a first start creates and migrates the SQLite database
STARTUP_FAILED = 3  # uvicorn's exit status when it did not start (its port taken, ...)


class ServerStart(Protocol):
    url: str
    secret: str  # what this process presents to the server

    def pending(self) -> bool:
        """Whether this command started the server and has not yet seen it answer."""
        ...

    def answering(self) -> bool:
        """Whether the server would answer now (never waits)."""
        ...

    def ready(self) -> str: ...

    def close(self) -> None:
        """The command is done with the server (or never used it)."""
        ...


class TemporaryServer:
    """Prefect's temporary server for one command: ``uvicorn`` serving Prefect's API
    (no UI) on a free loopback port, its SQLite database in ``PREFECT_HOME``, closed with a
    secret that lives as long as it (other accounts of the machine reach loopback ports).
    The same server Prefect's ephemeral mode starts, without importing it here, and one
    that stops by itself if the command is killed (:mod:`calypso.flows.prefect_server`)."""

    def __init__(self) -> None:
        self.secret = f"calypso:{secrets.token_urlsafe(32)}"
        hide_prefect_secret(self.secret)
        self._process: subprocess.Popen | None = None
        self._answered = False
        self._start()

    def _start(self) -> None:
        port = prefect_server.free_port()
        self.url = prefect_server.api_url(port)
        environment = dict(
            os.environ,
            PREFECT_UI_ENABLED="0",
            PREFECT__SERVER_EPHEMERAL="1",
            # Not PREFECT__SERVER_FINAL: with FastAPI >= 0.137 all it does is a full garbage
            # collection after the routes are built, ~0.3 s while the command waits; the
            # collector is off until the server has started (calypso.flows.startup), and
            # this server lives as long as one command.
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # No UI, so nobody picks a block type from its catalogue: registering Prefect's
            # (and importing its collections for them, prefect-dask's Dask) cost ~0.35 s of
            # every start. The blocks a run saves register their own types.
            PREFECT_API_BLOCKS_REGISTER_ON_START="false",
            PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION="false",
            # Nor automations: a command's run triggers none (~0.2 s of every start).
            PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false",
            **{SERVER_AUTH: self.secret, AUTH: self.secret},
        )
        self._process = prefect_server.start(port, environment)

    def pending(self) -> bool:
        return not self._answered

    def answering(self) -> bool:
        """uvicorn listens once Prefect's app has started: a connection taken is a server
        that answers (refused at once before; :meth:`ready` still asks it properly)."""
        if self._answered:
            return True
        address = urllib.parse.urlsplit(self.url)
        try:
            socket.create_connection((address.hostname, address.port), timeout=0.05).close()
        except OSError:
            return False
        return True

    def ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        ports = 3  # a start that fails again on another port is not about the port
        while not prefect_answers(self.url, self.secret, timeout=1.0):
            status = self._process.poll() if self._process else -1
            if status == STARTUP_FAILED and ports > 1:  # maybe another process took the port
                ports -= 1
                self.close()  # reaped, what it said passed on
                self._start()
            elif status is not None or time.monotonic() > deadline:
                self.close()
                raise ConfigurationError(
                    f"Prefect's temporary server did not start (exit status {status}; its "
                    "errors are above, with -v): set PREFECT_API_URL to a running server "
                    "(`calypso server`), or leave server.local_keep_s at its default to "
                    "keep a local one"
                )
            time.sleep(0.05)
        self._answered = True
        return self.url

    def close(self) -> None:
        """Stop the server: it is this command's alone. Without waiting for its end: its
        graceful shutdown is ~0.2 s of ``uvicorn`` looking for it every 0.1 s, and what
        this command sent it (the run's states, logs and events) it has already taken."""
        process, self._process = self._process, None
        if process is not None:
            prefect_server.stop(process, 5, wait=False)


@contextmanager
def begin_prefect_api(settings: CalypsoSettings) -> Iterator[ServerStart | None]:
    """Begin starting this command's Prefect API (None: ``PREFECT_API_URL`` names one),
    closed on the way out (see :meth:`ServerStart.close`)."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    if settings.server.local_keep_s > 0:
        from calypso.flows.local_server import LocalServerStart

        secret = prefect_api_secret(settings)
        start: ServerStart = LocalServerStart(
            settings.home, settings.server.local_keep_s, secret, prefect_auth_string(settings)
        )
    else:
        start = TemporaryServer()
    saved = os.environ.get(AUTH)
    os.environ[AUTH] = start.secret  # what this process and the workers it starts present
    try:
        yield start
    finally:
        start.close()
        if saved is None:
            os.environ.pop(AUTH, None)
        else:
            os.environ[AUTH] = saved


@contextmanager
def prefect_api(
    settings: CalypsoSettings | None = None,
    starting: Callable[[str], None] | None = None,
    begun: ServerStart | None = None,
) -> Iterator[str]:
    """Make sure a Prefect API serves this process *and* its Dask workers: the one
    ``PREFECT_API_URL`` names, else the one ``begun`` (:func:`begin_prefect_api`), else one
    begun now. ``starting(address)`` is called as soon as the address is known, before
    the server answers (what depends on the address, such as the kept Dask cluster,
    starts meanwhile). Left alone, each Dask worker process would start a temporary
    server of its own."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    if begun is None:
        settings = settings or load_settings()
        with begin_prefect_api(settings) as start, prefect_api(settings, starting, start) as url:
            yield url
        return
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    if starting is not None:
        starting(begun.url)
    url = begun.ready()
    os.environ["PREFECT_API_URL"] = url
    try:
        updates = {PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: begun.secret}
        with temporary_settings(updates=updates):
            yield url
    finally:
        drain_prefect_queues()
        del os.environ["PREFECT_API_URL"]


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
