"""A Prefect server started by the first ``calypso run`` that needs one, kept for the next.

Without ``PREFECT_API_URL`` a run needs a Prefect server of its own. Prefect's temporary
server costs a command 5-10 s on this machine (its imports, the SQLite database's
checks, the health wait) and is gone when the command ends, with the runs it recorded
out of sight. Like Jupyter's and Dask's local services, the first command instead
starts one in the background, on loopback, closed with the secret of Calypso's home
(``<home>/prefect-auth``, as ``calypso server``), and the next commands with the same
home find it (``<home>/local-server.json``) and use it: their runs start at once, and
the Prefect UI at its address shows them all. It stops by itself once no command has
used it and no flow run has been active for ``server.local_keep_s`` (30 min);
``server.local_keep_s = 0`` goes back to one temporary server per command.

The keeper is ``python -m calypso.flows.local_server HOME``: it starts ``prefect server
start`` on a free loopback port, writes the address once the server answers, and
watches. A command marks its use by touching the address file.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from calypso.errors import ConfigurationError
from calypso.private_files import create_private_file, private_folder

ADDRESS = "local-server.json"
START_TIMEOUT_S = 120.0  # a first start creates and migrates the database
LOOK_EVERY_S = 30.0  # how often the keeper asks whether the server is still used


def address_path(home: Path) -> Path:
    return home / ADDRESS


def _healthy(url: str, auth: str | None = None, timeout: float = 2.0) -> bool:
    request = urllib.request.Request(f"{url}/health")
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: not ours to use
        return False
    return True


def find(home: Path) -> str | None:
    """The API address of this home's local server when it runs and answers, else None.
    Finding it counts as using it."""
    path = address_path(home)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _running(int(known.get("pid", 0))) or not _healthy(known["url"]):
        return None
    used(home)
    return known["url"]


def used(home: Path) -> None:
    """Mark the home's local server as used now (the keeper counts idle time from here)."""
    with suppress(OSError):  # stopped meanwhile: the next command starts another
        os.utime(address_path(home))


_held: list = []  # the use locks of this process, released when it exits


def hold(home: Path) -> None:
    """Hold the home's local server for this process's lifetime (a shared lock: a keeper
    never stops a server a living command may still send logs and states to)."""
    use = open(home / ".local-server.use", "a")  # noqa: SIM115 (held until exit)
    fcntl.flock(use, fcntl.LOCK_SH)
    _held.append(use)


def _unused(home: Path) -> bool:
    """No living command holds the server."""
    with open(home / ".local-server.use", "a") as use:
        try:
            fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(use, fcntl.LOCK_UN)
        return True


@contextmanager
def _starting_lock(home: Path):
    """One command at a time looks for, or starts, the home's server."""
    private_folder(home)
    with open(home / ".local-server.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(home: Path, keep_s: float) -> str:
    """The API address of this home's local server, started now if none runs."""
    with _starting_lock(home):
        url = find(home)
        if url:
            return url
        log = home / "local-server.log"
        with open(log, "ab") as output:
            keeper = subprocess.Popen(
                [sys.executable, "-m", "calypso.flows.local_server", str(home), str(keep_s)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not the command's: Ctrl-C there leaves it running
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            url = find(home)
            if url:
                return url
            if keeper.poll() is not None:
                break
            time.sleep(0.2)
        keeper.kill()
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise ConfigurationError(
            f"the local Prefect server did not start within {START_TIMEOUT_S:.0f} s (its log: "
            f"{log}); start one with `calypso server`, or set CALYPSO_SERVER__LOCAL_KEEP_S=0 "
            f"for a temporary server per command\n{tail}"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _active_flow_runs(url: str, auth: str) -> bool:
    """Flow runs scheduled, pending or running on the server (a run outlives commands)."""
    import base64

    body = json.dumps(
        {
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}},
            "limit": 1,
        }
    ).encode()
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return bool(json.loads(response.read()))
    except OSError:
        return True  # cannot tell: keep it


def keep(home: Path, keep_s: float) -> int:
    """The keeper: run the server until it has been unused for ``keep_s``."""
    from calypso.flows.runtime import AUTH, SERVER_AUTH, prefect_auth_string
    from calypso.settings import load_settings

    settings = load_settings().model_copy(update={"home": home})
    secret = prefect_auth_string(settings)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, **{AUTH: secret, SERVER_AUTH: secret})
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_UI_API_URL", url)
    env.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "server", "start"]
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], env=env)
    path = address_path(home)

    def stop(*_):
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url, secret):
            if server.poll() is not None or time.monotonic() > deadline:
                return 1
            time.sleep(0.2)
        create_private_file(path, json.dumps({"url": url, "pid": os.getpid()}).encode(), True)
        print(f"local Prefect server on {url} (UI http://127.0.0.1:{port})", flush=True)
        while server.poll() is None:
            try:
                server.wait(timeout=min(LOOK_EVERY_S, max(keep_s / 2, 0.5)))
            except subprocess.TimeoutExpired:
                idle = time.time() - path.stat().st_mtime
                if idle > keep_s and _unused(home) and not _active_flow_runs(url, secret):
                    print(f"unused for {idle:.0f} s: stopping", flush=True)
                    server.terminate()
        return 0
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), float(sys.argv[2])))
