"""What every benchmark needs: a real Prefect server, the peak memory of a command and a
scratch folder that goes when the benchmark ends."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(1, str(REPO))  # conftest imports its neighbours as `tests.*`

from conftest import free_port, wait_for_http  # noqa: E402


def scratch_folder(prefix: str = "calypso-bench-") -> Path:
    """A new temporary folder, removed when the benchmark exits (a benchmark's data and
    results are gigabytes: left behind, a few runs fill the disk and later runs are refused
    for room); kept when ``CALYPSO_BENCH_KEEP`` is set, to look at the results."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("CALYPSO_BENCH_KEEP"):
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class PeakMemory(threading.Thread):
    """Largest summed RSS of a process and its children, sampled every 0.1 s; ``each``:
    the largest RSS of each of them (the command, the processes it started)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True
        self.each: dict[int, int] = {}

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while self.running:
            try:
                procs = [root, *root.children(recursive=True)]
                rss = {p.pid: p.memory_info().rss for p in procs}
                self.peak = max(self.peak, sum(rss.values()))
                for pid, each in rss.items():
                    self.each[pid] = max(self.each.get(pid, 0), each)
            except psutil.Error:
                pass
            time.sleep(0.1)


def isolated_environment(work: Path) -> dict[str, str]:
    """This process's environment with a private Calypso and Prefect home under ``work``:
    a command run in it is cold (a temporary Prefect server and a Dask cluster of its own,
    none kept). Give each Prefect server its own ``work``: servers sharing one SQLite
    database lock each other out ("database is locked": a 503, and a 2 s wait)."""
    env = dict(os.environ)
    env.update(CALYPSO_HOME=str(work / "calypso"), PREFECT_HOME=str(work / "prefect"))
    env["CALYPSO_SERVER__LOCAL_KEEP_S"] = "0"
    env["CALYPSO_EXECUTOR__LOCAL_KEEP_S"] = "0"
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_AUTH_STRING", None)  # the server's secret is in the private home
    return env


@contextmanager
def prefect_server(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start `calypso server` on a free port; yield ``env`` pointing PREFECT_API_URL at it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "server", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", 120, server)
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        server.terminate()
        server.wait(timeout=30)


#: The largest RSS (bytes) of each process of the last :func:`time_command`, the command first.
LAST_PEAKS: list[int] = []


def time_command(command: list[str], env: dict[str, str]) -> tuple[float, dict, int]:
    """Run a `calypso ... --json` command: its wall time, JSON summary and peak RSS (bytes)
    (each process's: :data:`LAST_PEAKS`)."""
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    memory = PeakMemory(process.pid)
    memory.start()
    out, err = process.communicate()
    wall = time.perf_counter() - began
    memory.running = False
    LAST_PEAKS[:] = [memory.each.pop(process.pid, 0), *sorted(memory.each.values(), reverse=True)]
    if process.returncode:
        raise SystemExit(
            f"{' '.join(command[2:5])} failed ({process.returncode}):\n{err.decode()}{out.decode()}"
        )
    return wall, json.loads(out), memory.peak


@contextmanager
def warm_service(
    env: dict[str, str], root: Path, work: Path, technique: str
) -> Iterator[dict[str, str]]:
    """`calypso serve --technique TECHNIQUE` with data root ``root``; yields the
    environment whose `calypso run` submits to it."""
    env = {**env, "CALYPSO_DATA_ROOTS": json.dumps([str(root)])}
    socket_dir = Path(tempfile.mkdtemp(prefix="calypso-"))  # a short path: sun_path limit
    env["CALYPSO_SERVE__SOCKET"] = str(socket_dir / "serve.sock")
    log = work / f"serve-{technique}.log"
    command = [sys.executable, "-m", "calypso.flows.cli", "serve", "--technique", technique]
    with open(log, "wb") as output:
        served = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "runs can be submitted" not in log.read_text():
            if served.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"calypso serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        served.terminate()
        served.wait(timeout=60)


@contextmanager
def kept_local_server(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` in which `calypso run` uses the home's kept local Prefect server and Dask
    cluster (started by the first command, as on a user's machine, with no
    configuration); both stopped at the end."""
    import signal

    env = {**env, "CALYPSO_SERVER__LOCAL_KEEP_S": "600", "CALYPSO_EXECUTOR__LOCAL_KEEP_S": "600"}
    home = Path(env["CALYPSO_HOME"])
    try:
        yield env
    finally:
        for address in [*home.glob("clusters/*.json"), home / "local-server.json"]:
            if address.exists():
                os.kill(json.loads(address.read_text())["pid"], signal.SIGTERM)
