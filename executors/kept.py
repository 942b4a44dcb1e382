"""A local Dask cluster started by the first ``calypso run`` that needs one, kept for the next.

A command that starts a LocalCluster of its own spends 7-10 s of a two-core machine
starting worker processes (each imports pyFAI, silx, numba, h5py ...) and closing them,
for seconds of work. As the local Prefect server (:mod:`calypso.flows.local_server`) is,
the cluster is instead started by a keeper process in the background, and the next
commands that would start the same cluster find it and send their tasks there.

"The same cluster" is keyed by everything its workers would differ by:

* the cluster's options (workers, threads, memory limit, preloaded modules, TLS);
* the environment the workers inherit (``CALYPSO_*``, ``PREFECT_*``, ``DASK_*``, thread
  and HDF5 variables, ``PATH``, ``PYTHONPATH``) and the working folder;
* the Python interpreter, and the code: the modification times of Calypso's modules, so
  an edited or upgraded installation never runs on workers with the old code loaded;
* the Prefect API the runs report to: a worker keeps one log client for its life.

The keeper is ``python -m calypso.executors.kept HOME KEY KEEP_S`` with the options on
its standard input; it writes ``<home>/clusters/<key>.json`` (scheduler address, its
pid) once the workers are up, and closes the cluster once no command has used it for
``executor.local_keep_s`` (default 10 min) or its Prefect API has gone. A command marks
its use by touching the address file as it starts and ends, and holds a shared lock
while it runs. ``executor.local_keep_s = 0``: a cluster of its own for each command. A
home keeps :data:`KEPT_AT_MOST` clusters at once: a command that would start another
first stops the one used least recently that no command holds.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from calypso.errors import ConfigurationError
from calypso.private_files import create_private_file, private_folder

FOLDER = "clusters"
START_TIMEOUT_S = 180.0  # workers import the science while they start
# Clusters a home keeps at once: a command that would start another stops the one used
# least recently that no command holds. Each differs by technique, options and working
# folder: commands from several folders kept one each, two worker processes apiece, for
# their idle 10 minutes (a user's walk found five on a two-core machine).
KEPT_AT_MOST = 2
LOOK_EVERY_S = 30.0  # how often a keeper asks whether it is still used

# The variables a worker's behaviour can depend on; the shell's own (PWD, TERM ...) are not.
_ENVIRONMENT_PREFIXES = (
    "CALYPSO_",
    "PREFECT_",
    "DASK_",
    "HDF5_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "NUMBA_",
    "NUMEXPR_",
    "MALLOC_",
    "PYFAI_",
    "SILX_",
    "PYOPENCL_",
    "CUDA_",
    "PYTHON",
    "LD_",
    "SSL_",
)
_ENVIRONMENT_NAMES = ("PATH", "HOME", "TMPDIR", "DO_NOT_TRACK")
_API_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")  # the key has the API apart


# -- what the local Prefect server and the kept clusters share ------------------------------


def used(path: Path) -> None:
    """Mark a kept service as used now (its keeper counts idle time from here)."""
    with suppress(OSError):  # stopped meanwhile: the next command starts another
        os.utime(path)


_held: list = []  # the use locks of this process, released when it exits


def hold(lock: Path) -> None:
    """Hold a kept service for this process's lifetime (a shared lock: a keeper never
    stops a service a living command may still use)."""
    use = open(lock, "a")  # noqa: SIM115 (held until exit)
    fcntl.flock(use, fcntl.LOCK_SH)
    _held.append(use)


def unused(lock: Path) -> bool:
    """No living command holds the service."""
    with open(lock, "a") as use:
        try:
            fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(use, fcntl.LOCK_UN)
        return True


def idle_s(path: Path) -> float:
    """Seconds since a command last marked the service used."""
    return time.time() - path.stat().st_mtime


@contextmanager
def starting_lock(lock: Path) -> Iterator[None]:
    """One command at a time looks for, or starts, a kept service."""
    private_folder(lock.parent)
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def start_keeper(
    arguments: list[str],
    log: Path,
    find: Callable[[], str | None],
    what: str,
    setting: str,
    stdin: bytes = b"",
) -> str:
    """Start ``python -m <arguments>`` in a session of its own (Ctrl-C in the command leaves
    it running), logging to ``log``, and wait until ``find()`` gives its address. ``what``
    it starts, and the ``setting`` that keeps it, name it in the error."""
    keeper = spawn_keeper(arguments, log, stdin)
    return wait_for_keeper(keeper, log, find, what, setting)


def spawn_keeper(arguments: list[str], log: Path, stdin: bytes = b"") -> subprocess.Popen:
    """``python -m <arguments>`` in a session of its own, logging to ``log``; not waited for."""
    with open(log, "ab") as output:
        keeper = subprocess.Popen(
            [sys.executable, "-m", *arguments],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    keeper.stdin.write(stdin)  # type: ignore[union-attr]
    keeper.stdin.close()  # type: ignore[union-attr]
    return keeper


def wait_for_keeper(
    keeper: subprocess.Popen,
    log: Path,
    find: Callable[[], str | None],
    what: str,
    setting: str,
) -> str:
    """Wait until ``find()`` gives the address of what ``keeper`` starts (see
    :func:`start_keeper`); a keeper that ends or times out first is an error."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        if keeper.poll() is not None:
            break
        time.sleep(0.05)  # a file read until the keeper writes the address
    keeper.kill()
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise ConfigurationError(
        f"the {what} did not start within {START_TIMEOUT_S:.0f} s (its log: {log}); "
        f"set {setting}=0 to start one in each command instead\n{tail}"
    )


def prefect_answers(url: str, auth: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``url`` answers its health check (with ``auth``, the
    server's ``user:password``, where it asks for one)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/health")
    if auth:
        token = base64.b64encode(auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def prefect_started(
    server: subprocess.Popen, url: str, auth: str | None, timeout_s: float, poll: float = 0.1
) -> bool:
    """Whether the Prefect server just started as ``server`` answers at ``url`` within
    ``timeout_s``; False as soon as its process has ended."""
    deadline = time.monotonic() + timeout_s
    while not prefect_answers(url, auth, timeout=1.0):
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: not ours to use
        return False
    return True


def read_address(path: Path) -> dict[str, Any] | None:
    """A keeper's address file, when its keeper still runs."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return known if running(int(known.get("pid", 0))) else None


def forget_address(path: Path, pid: int | None = None) -> None:
    """Take the address of this keeper (or keeper ``pid``) away, not one a newer keeper
    wrote."""
    try:
        if json.loads(path.read_text()).get("pid") == (pid or os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


# -- the kept Dask cluster -------------------------------------------------------------------


def cluster_key(options: dict[str, Any], api_url: str | None) -> str:
    """What identifies the cluster a command would start (module docstring)."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if (name.startswith(_ENVIRONMENT_PREFIXES) or name in _ENVIRONMENT_NAMES)
        and name not in _API_VARIABLES  # set or not as the local server is found or started
    }
    identity = {
        "options": options,
        "environment": environment,
        "folder": os.getcwd(),
        "python": sys.executable,
        "code": _code_stamp(),
        "api": api_url,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _code_stamp() -> float:
    """The newest modification time of Calypso's modules (a few hundred stats)."""
    package = Path(__file__).resolve().parents[1]
    newest = 0.0
    for room in ("executors", "flows", "registry", "tasks", "techniques"):
        for folder, subfolders, files in os.walk(package / room):
            subfolders[:] = [s for s in subfolders if s not in ("node_modules", "static")]
            for name in files:
                if name.endswith(".py"):
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime)
    for name in os.listdir(package):
        if name.endswith(".py"):
            newest = max(newest, os.stat(package / name).st_mtime)
    return newest


def _paths(home: Path, key: str) -> tuple[Path, Path, Path, Path]:
    folder = home / FOLDER
    return (
        folder / f"{key}.json",
        folder / f"{key}.lock",
        folder / f"{key}.use",
        folder / f"{key}.log",
    )


def _answers(address: str) -> bool:
    host, port = address.split("://")[-1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def find_cluster(home: Path, key: str) -> str | None:
    """The scheduler address of the kept cluster ``key`` when it runs; finding it uses it."""
    path = _paths(home, key)[0]
    known = read_address(path)
    if known is None or not _answers(known["address"]):
        return None
    used(path)
    return known["address"]


def kept_cluster(
    home: Path, key: str, options: dict[str, Any], keep_s: float, api: tuple[str, str | None]
) -> str:
    """The scheduler address of the kept cluster ``key`` for the Prefect API ``api`` (its
    address and secret), started now if none runs; this process holds it until it exits
    (see :func:`release`)."""
    _, lock, use, log = _paths(home, key)
    with starting_lock(lock):
        address = find_cluster(home, key)
        if address is None:
            make_room(home, KEPT_AT_MOST - 1)
            arguments = ["calypso.executors.kept", str(home), key, str(keep_s)]
            # on its standard input: a secret never shows in a process list
            stdin = json.dumps({"options": options, "api": api}).encode()
            find = lambda: find_cluster(home, key)  # noqa: E731
            setting = "CALYPSO_EXECUTOR__LOCAL_KEEP_S"
            address = start_keeper(arguments, log, find, "local Dask cluster", setting, stdin)
        hold(use)
    return address


def make_room(home: Path, room_for: int) -> list[str]:
    """Stop this home's kept clusters, least recently used first, that no command holds,
    until at most ``room_for`` run; the keys stopped. One being looked at by another
    command (its starting lock taken) is left alone."""
    stopped: list[str] = []
    kept = sorted(kept_clusters(home), key=lambda cluster: cluster["idle_s"], reverse=True)
    for cluster in kept:
        if len(kept) - len(stopped) <= room_for:
            break
        path, lock, use, _ = _paths(home, cluster["key"])
        with open(lock, "a") as starting:
            try:
                fcntl.flock(starting, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if unused(use) and running(cluster["pid"]):
                os.kill(cluster["pid"], signal.SIGTERM)  # it closes its workers, then goes
                forget_address(path, cluster["pid"])
                stopped.append(cluster["key"])
    return stopped


def release(home: Path, key: str) -> None:
    """This command is done with the cluster: its keeper counts idle time from now."""
    used(_paths(home, key)[0])


def kept_clusters(home: Path) -> list[dict[str, Any]]:
    """This home's kept clusters that run: address, keeper pid, seconds since last used."""
    found = []
    for path in sorted((home / FOLDER).glob("*.json")):
        known = read_address(path)
        if known is not None:
            found.append(known | {"key": path.stem, "idle_s": round(idle_s(path))})
    return found


def keep(home: Path, key: str, keep_s: float) -> int:
    """The keeper: run the cluster until unused for ``keep_s`` or its Prefect API goes."""
    from calypso.executors.dask import fork_workers, start_local_cluster

    given = json.loads(sys.stdin.read())
    options, (api_url, secret) = given["options"], given["api"]
    # Its workers inherit this environment: pointed at the API from the start (the home's
    # local server may still be starting, and the command has not set it yet).
    os.environ["PREFECT_API_URL"] = api_url
    if secret:
        os.environ["PREFECT_API_AUTH_STRING"] = secret
    path, lock, use, _ = _paths(home, key)
    cluster = start_local_cluster(forked=fork_workers(options), **options)
    for number in (signal.SIGTERM, signal.SIGINT):  # close the workers, then go
        signal.signal(number, lambda *_: sys.exit(0))
    try:
        record = {"address": cluster.scheduler_address, "pid": os.getpid()}
        create_private_file(path, json.dumps(record).encode(), True)
        print(f"local Dask cluster {cluster.scheduler_address} ({key})", flush=True)
        look = min(LOOK_EVERY_S, max(keep_s / 2, 0.5))
        answered = False  # a local server may still be starting: gone once it has answered
        began = time.monotonic()
        while True:
            time.sleep(look)
            with starting_lock(lock):  # no command finds it while it decides to stop
                if idle_s(path) > keep_s and unused(use):
                    print(f"unused for {idle_s(path):.0f} s: stopping", flush=True)
                    forget_address(path)
                    break
            if prefect_answers(api_url, secret, timeout=5.0):
                answered = True
            elif answered or time.monotonic() - began > START_TIMEOUT_S:
                print(f"its Prefect API {api_url} has gone: stopping", flush=True)
                break
        return 0
    finally:
        forget_address(path)
        cluster.close()


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
