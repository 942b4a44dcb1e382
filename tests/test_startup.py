"""A process's start (flows/startup.py): the cyclic garbage collector off while it
imports, on again once it has started, or after a time limit if it never says so; and
the Prefect server Calypso starts (flows/prefect_server.py) has it on once it serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

from calypso.flows import prefect_server
from tests.processes import wait_until


def run_python(code: str) -> dict:
    """What ``code`` prints as JSON, run in a fresh interpreter (its collector untouched)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_the_collector_is_off_until_the_process_has_started():
    seen = run_python(
        """
        import gc, json
        from calypso.flows.startup import collect_from_now_on, collect_later

        collect_later()
        off = not gc.isenabled()
        import prefect  # what a start imports
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle made while starting: frozen with the rest
        del garbage
        collect_from_now_on()
        on, frozen = gc.isenabled(), gc.get_freeze_count()
        collect_from_now_on()  # a second call changes nothing
        cycle = [[]]
        cycle[0].append(cycle)
        del cycle
        print(json.dumps({"off": off, "on": on, "frozen": frozen, "again": gc.isenabled(),
                          "collected": gc.collect()}))
        """
    )
    assert seen["off"] and seen["on"] and seen["again"]
    assert seen["frozen"] > 10_000  # Prefect's modules, never scanned again
    assert seen["collected"] >= 2  # a cycle made after the start is collected as before


def test_a_process_that_never_says_it_started_gets_the_collector_back():
    seen = run_python(
        """
        import gc, json, time
        from calypso.flows.startup import collect_later

        collect_later(limit_s=0.3)
        off = not gc.isenabled()
        time.sleep(1.0)
        print(json.dumps({"off": off, "back": gc.isenabled()}))
        """
    )
    assert seen == {"off": True, "back": True}


def test_a_collector_turned_off_by_someone_else_stays_theirs():
    seen = run_python(
        """
        import gc, json
        from calypso.flows.startup import collect_from_now_on, collect_later

        gc.disable()
        collect_later()
        collect_from_now_on()
        print(json.dumps({"enabled": gc.isenabled()}))
        """
    )
    assert seen == {"enabled": False}


APPLICATION = '''
import gc

from calypso.flows.prefect_server import _AfterStartUp


async def application(scope, receive, send):
    """A minimal ASGI application with a lifespan: it tells whether the collector is on."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            # Still starting: were the collector on, the start fails and the server ends.
            assert not gc.isenabled()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f'{{"enabled": {str(gc.isenabled()).lower()}}}'.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def create_app():
    return _AfterStartUp(application)
'''


def test_the_prefect_server_process_collects_once_it_has_started(tmp_path: Path):
    """The process Calypso runs Prefect's server in (the same ``main``, another
    application), as ``prefect_server.start`` runs it: the collector is off while the
    application starts and on once it serves."""
    (tmp_path / "started_app.py").write_text(APPLICATION)
    port = prefect_server.free_port()
    command = [sys.executable, "-m", "calypso.flows.prefect_server", "--factory"]
    command += ["started_app:create_app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "error", "--lifespan", "on"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    try:

        def answer() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as reply:
                    return json.loads(reply.read())
            except OSError:
                assert server.poll() is None, "the server process ended"
                return None

        assert wait_until(answer, 60, "the server's answer", interval=0.1) == {"enabled": True}
    finally:
        prefect_server.stop(server, 10)


def test_a_prefect_server_says_why_it_failed_without_holding_the_callers_output(
    tmp_path: Path, capsys
):
    """The server Calypso starts writes on a pipe of its own, relayed to the caller's
    error output: a server that cannot start says why there, and a running one holds
    neither the caller's output nor its error output open (a pipeline or a program reading
    them ends with the caller, not after the server's shutdown)."""
    env = dict(os.environ, PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="ERROR")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path}/no/such.db"
    server = prefect_server.start(prefect_server.free_port(), env)
    ours = os.readlink("/proc/self/fd/2")  # this process's error output
    try:
        held = {fd: os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in (1, 2)}
        assert held[1] == "/dev/null"
        assert held[2].startswith("pipe:") and held[2] != ours
        assert server.wait(timeout=120) != 0
    finally:
        prefect_server.stop(server, 5, wait=False)  # ended by itself: its last words out
    assert "unable to open database file" in capsys.readouterr().err


def _first_route(routers: tuple, method: str, path: str):
    """The route that serves ``method path`` when ``routers`` are tried in order, as
    Starlette does: the first whose path pattern and methods both match."""
    from starlette.routing import compile_path

    for router in routers:
        for route in router.routes:
            pattern, _, _ = compile_path(route.path)
            if pattern.match(path) and method in (getattr(route, "methods", None) or {"WS"}):
                return route
    return None


def test_the_prefect_api_answers_every_path_as_before_with_the_runs_routers_first():
    """The temporary server's routers are reordered so that a run's first requests build
    only the routers it uses (flows/prefect_server.py:runs_routers_first): every route of
    Prefect's API must still be reached by the same requests."""
    import re
    import uuid

    from prefect.server.api.server import API_ROUTERS

    reordered = prefect_server.runs_routers_first(API_ROUTERS)
    assert sorted(map(id, reordered)) == sorted(map(id, API_ROUTERS))  # none lost or doubled
    first = [router.prefix.strip("/") for router in reordered[: len(prefect_server.RUN_PATHS)]]
    assert first == list(prefect_server.RUN_PATHS)

    checked = 0
    for router in API_ROUTERS:
        for route in router.routes:
            path = route.path
            path = re.sub(r"\{[^}:]+:uuid\}", str(uuid.uuid4()), path)
            path = re.sub(r"\{[^}]+\}", "x", path)
            for method in getattr(route, "methods", None) or {"WS"}:  # a websocket
                expected = _first_route(API_ROUTERS, method, path)
                assert expected is not None, (method, path)
                assert _first_route(reordered, method, path) is expected, (method, path)
                checked += 1
    assert checked > 150  # Prefect's whole API, not a few routes


def test_a_router_sharing_its_paths_with_another_keeps_its_place():
    from fastapi import APIRouter

    def endpoint() -> None: ...

    counts = APIRouter()  # no prefix, listed first: it serves /flows/count
    counts.add_api_route("/flows/count", endpoint, methods=["GET"])
    flows = APIRouter(prefix="/flows")  # /flows/{name} would serve it if tried first
    flows.add_api_route("/{name}", endpoint, methods=["GET"])
    logs = APIRouter(prefix="/logs")
    logs.add_api_route("/", endpoint, methods=["POST"])

    reordered = prefect_server.runs_routers_first((counts, flows, logs))
    assert reordered == (logs, counts, flows)
    assert _first_route(reordered, "GET", "/flows/count") is counts.routes[0]


def test_a_final_server_answers_without_a_full_collection_first(tmp_path: Path):
    """``PREFECT__SERVER_FINAL`` (the kept local server's, as ``prefect server start``'s)
    frees the routes FastAPI versions before 0.137 copied on include; with later ones all
    it did was a full garbage collection (~0.15-0.3 s) before the server answered."""
    seen = run_python(
        f"""
        import gc, json, os
        os.environ.update(PREFECT_HOME={str(tmp_path)!r}, PREFECT__SERVER_FINAL="1")
        import prefect.server.api.server as server
        calls, real = [], gc.collect
        gc.collect = lambda *args: calls.append(args) or real(*args)
        from calypso.flows.prefect_server import create_app
        create_app()
        copies = server._FASTAPI_COPIES_ROUTES_ON_INCLUDE
        print(json.dumps({{"copies": copies, "collections": len(calls)}}))
        """
    )
    assert seen == {"copies": False, "collections": 0}


def test_a_server_stopped_as_it_starts_stops_without_a_traceback(tmp_path: Path):
    """Prefect's server asked to stop as soon as it has started (a Ctrl-C 1-3 s into
    `calypso server`): Prefect stops its services before they have started, asserts
    ("Reactive triggers not started"), and uvicorn printed the traceback and "Application
    shutdown failed". Prefect's real application, its lifespan driven as uvicorn does."""
    seen = run_python(
        f"""
        import asyncio, json, os
        os.environ.update(PREFECT_HOME={str(tmp_path)!r}, PREFECT_UI_ENABLED="0")
        from calypso.flows.prefect_server import create_app

        async def main():
            messages = asyncio.Queue()
            for kind in ("lifespan.startup", "lifespan.shutdown"):  # the stop at once
                messages.put_nowait({{"type": kind}})
            sent = []

            async def send(message):
                sent.append(message["type"])

            scope = {{"type": "lifespan", "asgi": {{"version": "3.0"}}, "state": {{}}}}
            await create_app()(scope, messages.get, send)
            print(json.dumps(sent))

        asyncio.run(main())
        """
    )
    assert seen == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_prefects_block_types_are_registered_once_the_server_has_started_and_is_idle(
    tmp_path: Path,
):
    """A kept server (the local one, `calypso server`) registers Prefect's block types
    (the UI's catalogue) after it has answered and sat idle, not before it answers."""
    port = prefect_server.free_port()
    env = {k: v for k, v in os.environ.items() if "AUTH_STRING" not in k}
    env.pop("PREFECT_API_URL", None)
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_UI_ENABLED="0")
    server = prefect_server.start(port, env)
    url = prefect_server.api_url(port)

    def block_types() -> tuple[set[str]] | None:  # a tuple: true even when none is there
        request = urllib.request.Request(
            f"{url}/block_types/filter",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return ({block["slug"] for block in json.loads(reply.read())},)
        except OSError:
            assert server.poll() is None, "the server process ended"
            return None

    try:
        (first,) = wait_until(block_types, 120, "the server's answer", interval=0.05)
        assert "secret" not in first  # not before it answered
        registered = lambda: "secret" in (block_types() or (set(),))[0]  # noqa: E731
        assert wait_until(registered, 60, "Prefect's block types", interval=3.0)
    finally:
        prefect_server.stop(server, 10)


def test_prefects_app_turns_the_same_settings_into_variables_once_per_arguments():
    from prefect.settings import get_current_settings
    from prefect.settings.base import PrefectBaseSettings

    settings = get_current_settings()
    exported = PrefectBaseSettings.to_environment_variables
    asked: list[tuple] = []

    def counted(self, *args, **kwargs):
        if self is settings:
            asked.append((args, tuple(sorted(kwargs.items()))))
        return exported(self, *args, **kwargs)

    PrefectBaseSettings.to_environment_variables = counted
    try:
        expected = settings.to_environment_variables()
        with_aliases = settings.to_environment_variables(include_aliases=True)
        asked.clear()
        with prefect_server.settings_exported_once():
            first = settings.to_environment_variables()
            first["PREFECT_NOT_A_SETTING"] = "changed by its caller"  # a copy each time
            assert settings.to_environment_variables() == expected
            assert settings.hash_key() == str(hash(tuple(expected.items())))
            assert settings.to_environment_variables(include_aliases=True) == with_aliases
            assert settings.to_environment_variables(include_aliases=True) == with_aliases
        assert asked == [((), ()), ((), (("include_aliases", True),))]
        assert PrefectBaseSettings.to_environment_variables is counted  # as it was
    finally:
        PrefectBaseSettings.to_environment_variables = exported


def test_the_local_servers_keeper_starts_with_the_secret_it_is_given_not_the_settings(
    tmp_path: Path,
):
    """The keeper (calypso.flows.local_server) reads no settings before it starts the
    server: the command hands it the home's secret; without one it starts nothing."""
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, calypso.flows.local_server, calypso.flows.runtime;"
         "calypso.flows.runtime.hide_prefect_secret('calypso:secret');"
         "print('calypso.settings' in sys.modules, 'calypso.registry.catalogue' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert imported.stdout.split() == ["False", "False"]
    keeper = subprocess.run(
        [sys.executable, "-m", "calypso.flows.local_server", str(tmp_path), "60",
         str(prefect_server.free_port())],
        input="", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert keeper.returncode == 2 and "no user:password" in keeper.stdout
    assert not (tmp_path / "local-server.json").exists()


def test_a_busy_database_answer_says_to_ask_again_soon_once_in_a_while(monkeypatch):
    """Prefect answers 503 when SQLite is busy, and its client then waits 2 s, then 4 s:
    a new home's first command met it beside the server's starting services. The first
    503 in a while carries Retry-After: 0.1; the next ones, and other answers, nothing."""
    import asyncio

    from calypso.flows.prefect_server import RETRY_WINDOW_S, _AfterStartUp

    async def application(scope, receive, send):
        status = 503 if scope["path"] == "/busy" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = _AfterStartUp(application)
    clock = [1000.0]
    monkeypatch.setattr(prefect_server.time, "monotonic", lambda: clock[0])

    def answer(path: str) -> dict:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        asyncio.run(app({"type": "http", "path": path}, None, send))
        return dict(sent[0]["headers"])

    assert answer("/busy") == {b"retry-after": b"0.1"}
    assert answer("/ok") == {}
    clock[0] += 1.0
    assert answer("/busy") == {}  # a second in a row: Prefect's client backs off
    clock[0] += RETRY_WINDOW_S + 0.1
    assert answer("/busy") == {b"retry-after": b"0.1"}
