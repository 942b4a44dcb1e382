"""Shared fixtures: real data location, an isolated Calypso home, a real Prefect server.

A Prefect server (the one ``calypso server`` starts) runs for the whole test
session on a free loopback port, with its own SQLite database; tests and the
CLI processes they start talk to it through PREFECT_API_URL, with the secret it asks
for in PREFECT_API_AUTH_STRING. It is started in
``pytest_configure`` so the variable is set before any test module imports
Prefect.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.live_servers import (  # noqa: F401  (fixtures of live runs: docs/live.md)
    blissdata_url,
    live_settings,
    valkey_url,
)

REPO = Path(__file__).resolve().parents[1]
_server: subprocess.Popen | None = None
_state_dir = Path(tempfile.mkdtemp(prefix="calypso-tests-"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode} before answering {url}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def pytest_configure(config: pytest.Config) -> None:
    global _server
    os.environ["CALYPSO_HOME"] = str(_state_dir / "calypso")
    os.environ["PREFECT_HOME"] = str(_state_dir / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")
    os.environ.pop("CALYPSO_CONFIG", None)
    # No local cluster outlives the command that started it (tests/test_cli.py tests the
    # kept ones): the homes of the tests' commands are removed with the session.
    os.environ["CALYPSO_EXECUTOR__LOCAL_KEEP_S"] = "0"
    # Every local Dask cluster a test starts in this process has its nanny write
    # the workers' environment (NUMBA_NUM_THREADS=1 ...) into this process's own;
    # numba refuses a thread count that changes once its threads have started,
    # so this process starts with the value the nannies will write.
    os.environ["NUMBA_NUM_THREADS"] = "1"
    if find_spec("pyopencl") is None:
        os.environ["SILX_OPENCL"] = "0"
    if os.environ.get("PREFECT_API_URL"):
        return
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: each worker starts its own server
    port = free_port()
    log = open(_state_dir / "prefect-server.log", "wb")  # noqa: SIM115 (kept open for the session)
    _server = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "server", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=120, process=_server)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    # Its API asks for the secret `calypso server` keeps in Calypso's home: the tests and
    # the commands they start (some with homes of their own) present it.
    from calypso.flows.runtime import prefect_auth_string
    from calypso.settings import load_settings

    os.environ["PREFECT_API_AUTH_STRING"] = prefect_auth_string(load_settings())


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.clusters import close_clusters

    close_clusters()
    if _server is not None:
        if "prefect" in sys.modules:  # deliver queued logs before the server goes
            from calypso.flows.prefect_api import drain_prefect_queues

            drain_prefect_queues()
        _server.terminate()
        try:
            _server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _server.kill()


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shared real data (CALYPSO_TEST_DATA, default ../shared/data)."""
    root = Path(os.environ.get("CALYPSO_TEST_DATA", REPO.parent / "shared" / "data"))
    if not (root / "SOURCES.md").is_file():
        pytest.skip(f"real test data not found at {root}: set CALYPSO_TEST_DATA")
    return root


@pytest.fixture(scope="session")
def diffraction_sample(tmp_path_factory: pytest.TempPathFactory):
    """A small simulated Bliss diffraction dataset (12 Pilatus 1M frames in 3 Lima files)."""
    from calypso.flows.samples.diffraction import write_diffraction_sample

    root = tmp_path_factory.mktemp("visitor")
    return write_diffraction_sample(root, frames=12, frames_per_file=5, seed=1)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A catalogue shared by the tests of one module (their flow runs register there)."""
    path = tmp_path_factory.mktemp("catalogue") / "catalogue.sqlite"
    os.environ["CALYPSO_CATALOGUE__PATH"] = str(path)
    yield path
    del os.environ["CALYPSO_CATALOGUE__PATH"]


@pytest.fixture
def catalogue_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh catalogue for one test."""
    path = tmp_path / "catalogue.sqlite"
    monkeypatch.setenv("CALYPSO_CATALOGUE__PATH", str(path))
    return path


@pytest.fixture(scope="session")
def loopback():
    """Helpers for tests that start servers: ``free_port()`` and ``wait_for_http(url, ...)``."""
    from types import SimpleNamespace

    return SimpleNamespace(free_port=free_port, wait_for_http=wait_for_http)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--virtual-time-budget=20000",
]


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Run headless Chromium (Debian's package) on a page: ``chromium(url, "--dump-dom")``
    returns what it printed. Installed here with apt-get when missing and allowed."""
    import shutil

    binary = shutil.which("chromium")
    if binary is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            capture_output=True,
            timeout=900,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian's chromium is not installed and cannot be: apt-get install chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(url: str, *arguments: str) -> str:
        result = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout

    def sign_in(ui: str, secret: str) -> None:
        """Sign the profile in to a Prefect UI that asks for ``secret``, as its login form
        does: the secret, base64-encoded, in the origin's localStorage (set through the
        DevTools protocol, then kept by the profile for the later pages)."""
        import base64
        import json

        from websockets.sync.client import connect

        active = profile / "DevToolsActivePort"
        active.unlink(missing_ok=True)
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
        browser = subprocess.Popen(
            [binary, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", ui],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not active.is_file() or not active.read_text().strip():
                assert time.monotonic() < deadline, "Chromium's DevTools did not start"
                time.sleep(0.2)
            port, browser_path = active.read_text().split()[:2]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                [page] = [t for t in json.load(response) if t["type"] == "page"]
            token = base64.b64encode(secret.encode()).decode()
            with connect(page["webSocketDebuggerUrl"], max_size=None) as page_socket:
                for attempt in range(100):  # until the UI's page (its origin) has loaded
                    page_socket.send(
                        json.dumps(
                            {
                                "id": attempt,
                                "method": "Runtime.evaluate",
                                "params": {
                                    "expression": f"location.origin === {json.dumps(ui)} && "
                                    f"(localStorage.setItem('prefect-password', '{token}'), "
                                    "true)",
                                    "returnByValue": True,
                                },
                            }
                        )
                    )
                    while (answer := json.loads(page_socket.recv())).get("id") != attempt:
                        pass
                    if answer.get("result", {}).get("result", {}).get("value") is True:
                        break
                    time.sleep(0.2)
                else:
                    raise AssertionError(f"Chromium never showed {ui}")
            # A clean close writes the profile's localStorage to disk.
            with connect(f"ws://127.0.0.1:{port}{browser_path}") as browser_socket:
                browser_socket.send(json.dumps({"id": 1, "method": "Browser.close"}))
            browser.wait(timeout=30)
        finally:
            if browser.poll() is None:
                browser.kill()
                browser.wait()

    run.sign_in = sign_in  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="session")
def test_artifacts() -> Path:
    """Where tests keep what a person may want to look at (screenshots): CALYPSO_TEST_ARTIFACTS,
    default <repo>/test-artifacts."""
    folder = Path(os.environ.get("CALYPSO_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def scheduler() -> str:
    """The session's Dask cluster of one worker (tests/clusters.py) for in-process runs."""
    from tests.clusters import shared_cluster

    return shared_cluster(1)


@pytest.fixture
def on_shared_cluster(monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs this test starts in this process (the CLI's too) use the session's cluster of
    two workers (what a local cluster has on this machine); processes the test starts
    inherit the setting too, so tests that kill workers start their own."""
    from tests.clusters import on_cluster

    for name, value in on_cluster(2).items():
        monkeypatch.setenv(f"CALYPSO_EXECUTOR__{name.upper()}", str(value))
    return on_cluster(2)["address"]
