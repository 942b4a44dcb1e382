"""Prefect's server as the child of a Calypso process, gone with that process however it ends.

``python -m calypso.flows.prefect_server UVICORN-ARGUMENTS``: ``uvicorn`` with the same
arguments, plus a thread that stops the server (as SIGTERM does) once the process that
started it has gone, and Python's cyclic garbage collector off until the server has
started (:mod:`calypso.flows.startup`: ~0.5 s of its ~3 s start). A command's temporary
server and the local server's keeper (:mod:`calypso.flows.local_server`) start it this
way: a process killed with SIGKILL cannot stop its server itself, and left alone the
server (Prefect's own ephemeral one has the same flaw) would run until the machine
restarts. Kept free of Calypso's other modules (but :mod:`calypso.flows.startup`): it
starts no slower than ``uvicorn`` itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from calypso.flows.startup import collect_from_now_on, collect_later

LOOK_EVERY_S = 0.5
IDLE_S = 2.0  # no request for this long: the server's deferred start-up work is done
DEFER_AT_MOST_S = 30.0  # ... or this long after its start
ORPHAN_GRACE_S = 10.0  # an orphaned server's graceful shutdown, at most
RELAY_S = 2.0  # to pass on what a server that ended by itself said last
# A 503 (Prefect's answer to SQLite being busy) says when to ask again: soon, unless
# another came within the window (then Prefect's client backs off as it does by itself).
RETRY_AFTER = b"0.1"
RETRY_WINDOW_S = 5.0
_RELAYS: dict[int, threading.Thread] = {}  # by server pid: what passes its errors on
PARENT = "CALYPSO_SERVER_PARENT"  # the pid of the process that starts the server


def free_port() -> int:
    """A loopback port free now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def serve_command(host: str, port: int, log_level: str) -> list[str]:
    """The command that serves Prefect's API and UI on ``host``:``port`` (what ``prefect
    server start`` runs, with :func:`create_app`): the temporary server's, the local
    server's keeper's, and ``calypso server``'s."""
    command = [sys.executable, "-m", "calypso.flows.prefect_server", "--factory"]
    command += ["calypso.flows.prefect_server:create_app", "--host", host, "--port", str(port)]
    return [*command, "--log-level", log_level, "--lifespan", "on"]


def start(port: int, environment: dict[str, str]) -> subprocess.Popen:
    """Prefect's server on loopback ``port`` (what ``prefect server start`` runs, without
    its command line's ~1 s of imports), in ``environment``, stopping when this process
    goes. What it says (its errors) appears on this process's error output, relayed: the
    server does not hold this process's own output open, so a pipeline or a program
    reading it ends with this process, not with the server's shutdown after it."""
    command = serve_command("127.0.0.1", port, "error")
    environment = {**environment, PARENT: str(os.getpid())}
    from calypso.executors.interrupts import ctrl_c_left_to_this_process

    # Stopped by this process (SIGTERM), not by a Ctrl-C at its terminal: gone first, the
    # server left the command retrying its last reports against it for a minute or more.
    with ctrl_c_left_to_this_process(multiprocessing=False):
        server = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # uvicorn's access log (off at this level)
            stderr=subprocess.PIPE,
        )
    relay = threading.Thread(target=_relay, args=(server.stderr,), daemon=True)
    relay.start()
    _RELAYS[server.pid] = relay
    return server


def _relay(errors: Any) -> None:
    for line in iter(errors.readline, b""):
        with suppress(OSError, ValueError):  # this process's output closed: dropped
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()


def stop(server: subprocess.Popen, grace_s: float, wait: bool = True) -> None:
    """Stop ``server`` (SIGTERM, then SIGKILL after ``grace_s``) and reap it. ``wait``
    False: return at once, reaped by a thread of this process, or, if this process ends
    first, by whoever inherits it (the server then ends itself, :func:`_stop_when_orphaned`).
    """
    if server.poll() is not None:  # it ended by itself: its last words out first
        relay = _RELAYS.pop(server.pid, None)
        if relay is not None:
            relay.join(timeout=RELAY_S)
        return
    _RELAYS.pop(server.pid, None)
    server.terminate()
    if not wait:
        threading.Thread(target=_reap, args=(server, grace_s), daemon=True).start()
        return
    _reap(server, grace_s)


def _reap(server: subprocess.Popen, grace_s: float) -> None:
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# The first segments of the API paths a flow run uses, in the order it first asks them
# (its client's version check, the CSRF token, the flow and its run, the result storage's
# block, logs, artifacts, the events' websocket).
RUN_PATHS = (
    *("admin", "csrf-token", "flows", "flow_runs"),
    *("block_types", "logs", "artifacts", "events"),
)


def create_app() -> _AfterStartUp:
    """Prefect's server application (what ``prefect server start`` serves), its API's
    routers that a flow run uses first (:func:`runs_routers_first`)."""
    import prefect.server.api.server as prefect_server
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_BLOCKS_REGISTER_ON_START

    from calypso.flows import prefect_database

    database = prefect_database.provide_configured()  # before the migrations
    if database is not None and prefect_database.at_head(database):
        # Nothing for Prefect's migrations to do: skip their check (~0.1 s of the start).
        os.environ["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
    # Prefect's block types (the UI's catalogue of blocks) are registered once the server
    # has started and sits idle, not before it answers: ~0.4 s of a new home's first
    # command, and the check that they are (importing Prefect's collections: prefect-dask,
    # so Dask) at every start. The blocks a run saves register their own types.
    register_blocks = bool(PREFECT_API_BLOCKS_REGISTER_ON_START.value())  # env, profile
    os.environ["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
    os.environ["PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION"] = "false"
    refresh_global_settings_context()
    if not getattr(prefect_server, "_FASTAPI_COPIES_ROUTES_ON_INCLUDE", True):
        # "Final" (the kept local server's) frees the routes older FastAPI versions copied
        # on include; with this one it only runs a full garbage collection (~0.3 s) before
        # the server answers. The collector runs once the server has started anyway.
        os.environ.pop("PREFECT__SERVER_FINAL", None)
    routers = getattr(prefect_server, "API_ROUTERS", None)
    if isinstance(routers, tuple):
        prefect_server.API_ROUTERS = runs_routers_first(routers)
    with settings_exported_once():
        app = prefect_server.create_app()
    return _AfterStartUp(app, _register_block_types if register_blocks else None)


@contextmanager
def settings_exported_once() -> Iterator[None]:
    """Prefect's settings turned into environment variables once per settings object and
    arguments, not at every call. Prefect's ``create_app`` does it three times for the
    same settings (the keys of its two application caches, then its logging
    configuration's template), ~0.07 s each while the command waits for the server.
    The settings do not change meanwhile: a change makes a new settings object."""
    from prefect.settings.base import PrefectBaseSettings

    exported = PrefectBaseSettings.to_environment_variables
    made: dict[tuple, tuple[Any, dict[str, str]]] = {}

    def once(self: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
        key = (id(self), args, tuple(sorted(kwargs.items())))
        if key not in made:  # the object is kept with its variables: its id is not reused
            made[key] = (self, exported(self, *args, **kwargs))
        return dict(made[key][1])

    PrefectBaseSettings.to_environment_variables = once  # type: ignore[method-assign]
    try:
        yield
    finally:
        PrefectBaseSettings.to_environment_variables = exported  # type: ignore[method-assign]


async def _register_block_types() -> None:
    """What Prefect's server does as it starts with ``PREFECT_API_BLOCKS_REGISTER_ON_START``
    (its own blocks and those of the collections installed)."""
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)


def runs_routers_first(routers: tuple) -> tuple:
    """``routers`` with those serving :data:`RUN_PATHS` first, the others after in the
    same order. FastAPI builds the state of an included router's routes when a request
    first reaches it, trying the routers in order: Prefect's version check, its second
    to last, built them all (~0.2 s, ~0.4 s with the command's start beside it) while
    the command waited for its first answer. Only a router whose paths no other router
    shares moves, so each request still reaches the same route."""
    segments = [{route.path.strip("/").split("/")[0] for route in r.routes} for r in routers]
    seen = Counter(segment for own in segments for segment in own)
    rank = {path: i for i, path in enumerate(RUN_PATHS)}
    first: list[tuple[int, Any]] = []
    after = []
    for router, own in zip(routers, segments, strict=True):
        (segment,) = own if len(own) == 1 else (None,)
        if segment in rank and seen[segment] == 1:
            first.append((rank[segment], router))
        else:
            after.append(router)
    return (*(router for _, router in sorted(first, key=lambda ranked: ranked[0])), *after)


class _AfterStartUp:
    """An ASGI application that turns the garbage collector back on when its start-up
    (its lifespan's start: Prefect's database, services) is complete, and then runs
    ``when_idle()`` once no request has come for :data:`IDLE_S` (at the latest
    :data:`DEFER_AT_MOST_S` after the start).

    A 503 it answers carries ``Retry-After: 0.1`` unless another went out in the last
    :data:`RETRY_WINDOW_S`. Prefect's server answers 503 when SQLite is busy: a write
    whose snapshot another writer overtook fails at once, whatever the busy timeout.
    It happens as the server starts, its services' first rounds beside a command's
    first run: Prefect's client then waited 2 s, and 4 s more when the retry met the
    block types' registration (a new home's first command: 7.4-10.9 s against 4.4-6.3
    s). One conflict clears at once; more in a row back off as the client does."""

    def __init__(self, app: Any, when_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app, self._when_idle = app, when_idle
        self._last_request = time.monotonic()
        self._last_busy = -RETRY_WINDOW_S

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            self._last_request = time.monotonic()
            if scope["type"] != "http":
                return await self.app(scope, receive, send)

            async def retry_soon(message: dict) -> None:
                if message["type"] == "http.response.start" and message["status"] == 503:
                    message = self._retry_after(message)
                await send(message)

            return await self.app(scope, receive, retry_soon)

        async def started(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete":
                collect_from_now_on()
                if self._when_idle is not None:
                    self._idle_task = asyncio.get_running_loop().create_task(self._idle())
            elif message["type"] == "lifespan.shutdown.failed" and _stopped_before_started(
                message.get("message", "")
            ):
                message = {"type": "lifespan.shutdown.complete"}
            await send(message)

        try:
            await self.app(scope, receive, started)
        except AssertionError as exc:
            if not _stopped_before_started(str(exc)):
                raise

    def _retry_after(self, message: dict) -> dict:
        headers = list(message.get("headers", []))
        now = time.monotonic()
        first, self._last_busy = now - self._last_busy > RETRY_WINDOW_S, now
        if not first or any(name.lower() == b"retry-after" for name, _ in headers):
            return message
        return {**message, "headers": [*headers, (b"retry-after", RETRY_AFTER)]}

    async def _idle(self) -> None:
        latest = time.monotonic() + DEFER_AT_MOST_S  # a UI open on it asks every few seconds
        while (quiet := time.monotonic() - self._last_request) < IDLE_S:
            if time.monotonic() > latest:
                break
            await asyncio.sleep(IDLE_S - quiet)
        try:
            await self._when_idle()  # type: ignore[misc]
        except Exception as exc:  # the server serves on; the UI's catalogue lacks them
            print(f"calypso: Prefect's block types were not registered: {exc}", file=sys.stderr)


def _stopped_before_started(error: str) -> bool:
    """Whether a shutdown failed only because Prefect stopped a service (its triggers,
    event persister, loggers) that had not started yet: asked to stop as it starts (a
    Ctrl-C 1-3 s into `calypso server`, 4 of 10 tries), Prefect asserts and the shutdown
    printed a traceback. The service had nothing to stop."""
    return error.rstrip().endswith(" not started")


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(LOOK_EVERY_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown
    time.sleep(ORPHAN_GRACE_S)  # and if that hangs, nobody is left to end it but itself
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    collect_later()  # back on once the server has started (_AfterStartUp)
    # The starter says who it is: one killed before this line runs has already left this
    # process to another parent (init, or a subreaper), which must not pass for it. A
    # server no Calypso process started (`calypso server`, an operator's) is nobody's to
    # follow: it stopped as the shell that started it in the background exited.
    if PARENT in os.environ:
        parent = int(os.environ.pop(PARENT))
        threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    # Prefect's server imports py-key-value (through docket), whose modules beartype
    # instruments as they are imported, for checks that only ever warn: ~0.05 s of the
    # start. The library's own switch turns them off.
    os.environ.setdefault("PY_KEY_VALUE_DISABLE_BEARTYPE", "true")
    from uvicorn.main import main as uvicorn

    uvicorn(sys.argv[1:], prog_name="uvicorn")


if __name__ == "__main__":
    main()
