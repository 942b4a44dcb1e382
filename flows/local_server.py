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

The keeper is ``python -m calypso.flows.local_server HOME``: it starts Prefect's server
(what ``prefect server start`` runs) on a free loopback port, writes the address once the
server answers, and watches. A command marks its use by touching the address file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path

from calypso.executors import kept
from calypso.executors.kept import read_address
from calypso.flows import prefect_server
from calypso.private_files import create_private_file

ADDRESS = "local-server.json"
STOP_WAIT_S = 35.0  # a keeper stopped by its command: its server's own stop waits 30 s
USE = ".local-server.use"
START_TIMEOUT_S = 120.0  # a first start creates and migrates the database


def address_path(home: Path) -> Path:
    return home / ADDRESS


def find(home: Path) -> str | None:
    """The API address of this home's local server when it runs and answers, else None.
    Finding it counts as using it."""
    known = read_address(address_path(home))
    if known is None or not kept.prefect_answers(known["url"]):
        return None
    used(home)
    return known["url"]


def used(home: Path) -> None:
    """Mark the home's local server as used now (the keeper counts idle time from here)."""
    kept.used(address_path(home))


def hold(home: Path) -> None:
    """Hold the home's local server for this process's lifetime: a keeper never stops a
    server a living command may still send logs and states to."""
    kept.hold(home / USE)


class LocalServerStart:
    """This home's local server, found running or being started by this command.

    Begun before the command imports Prefect and reads its input, so the server starts
    while the plan is made; :meth:`ready` waits for it. One command at a time looks for or
    starts it: the home's start lock is held until the server answers (by a thread, not
    for the whole plan). A command that stops before using the server it started (bad
    input, Ctrl-C) stops its keeper (:meth:`close`) unless another command holds the
    server already (a command that finds it holds it at once, under the start lock); one
    that used it leaves it to its keeper, which stops it once unused. ``secret``:
    what this command presents to it; ``server_secret``: what the server asks for (the
    home's, ``<home>/prefect-auth``), handed to a keeper started now.
    """

    def __init__(self, home: Path, keep_s: float, secret: str, server_secret: str) -> None:
        self.home, self.secret = home, secret
        self._lock = ExitStack()
        self._lock.enter_context(kept.starting_lock(home / ".local-server.lock"))
        self._keeper: subprocess.Popen | None = None
        self._answered = False
        self._guard = threading.Lock()  # between answering and being abandoned
        self.url = find(home)
        if self.url:
            hold(home)  # under the start lock: a command that started it sees it held
            self._lock.close()
            self._waiting = None
            return
        port = prefect_server.free_port()
        self.url = prefect_server.api_url(port)
        arguments = ["calypso.flows.local_server", str(home), str(keep_s), str(port)]
        # The secret on its input: the keeper starts the server without reading (and
        # importing) Calypso's settings to find it: 0.11-0.14 s before the server starts,
        # against 0.19-0.20 s.
        self._keeper = kept.spawn_keeper(
            arguments, home / "local-server.log", server_secret.encode()
        )
        pool = ThreadPoolExecutor(1, "calypso-local-server")
        self._waiting = pool.submit(self._wait)
        pool.shutdown(wait=False)

    def _wait(self) -> None:
        try:
            kept.wait_for_keeper(
                self._keeper,
                self.home / "local-server.log",
                lambda: find(self.home),
                "local Prefect server",
                "CALYPSO_SERVER__LOCAL_KEEP_S",
            )
            with self._guard:
                self._answered = True
        finally:
            self._lock.close()  # other commands may look for it (and find it) now

    def pending(self) -> bool:
        return self._waiting is not None and not self._waiting.done()

    def answering(self) -> bool:
        return not self.pending()

    def ready(self) -> str:
        """The server's API address, once it answers; held for this process's lifetime
        from then on (its last logs reach the server)."""
        if self._waiting is not None:
            self._waiting.result()
        hold(self.home)
        return self.url

    def close(self) -> None:
        """Stop the keeper this command started if no command used its server (this one
        was refused before its run, say); else mark the server used now (its keeper counts
        idle time from here)."""
        with self._guard:
            if self._keeper is not None and not self._answered:
                self._stop_keeper()
            elif self._keeper is not None:
                # It answered: another command may have found it since, and holds it.
                with kept.starting_lock(self.home / ".local-server.lock"):
                    if kept.unused(self.home / USE):
                        self._stop_keeper()
                    else:
                        used(self.home)
            else:
                used(self.home)
            self._keeper = None

    def _stop_keeper(self) -> None:
        assert self._keeper is not None
        with suppress(ProcessLookupError):  # the keeper and its server: its session
            os.killpg(self._keeper.pid, signal.SIGTERM)
        # Gone with the command, its address too: the keeper forgets it as it ends (a CI
        # run found the address still there just after the command).
        with suppress(subprocess.TimeoutExpired):
            self._keeper.wait(timeout=STOP_WAIT_S)


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


def keep(home: Path, keep_s: float, port: int) -> int:
    """The keeper: run the server on ``port`` until it has been unused for ``keep_s``,
    closed with the secret on this process's input (the home's)."""
    from calypso.flows.runtime import AUTH, SERVER_AUTH, hide_prefect_secret

    secret = sys.stdin.read().strip()
    if ":" not in secret:
        print("no user:password on the keeper's input: the command starts it", flush=True)
        return 2
    hide_prefect_secret(secret)
    url = prefect_server.api_url(port)
    env = dict(os.environ, **{AUTH: secret, SERVER_AUTH: secret})
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_UI_API_URL", url)
    env.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
    # As `prefect server start` sets it (prefect_server.create_app drops it where all it
    # would do is a garbage collection before the server answers).
    env["PREFECT__SERVER_FINAL"] = "1"
    server = prefect_server.start(port, env)  # gone with this keeper, even killed
    path = address_path(home)

    def stop(*_):
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if not kept.prefect_started(server, url, secret, START_TIMEOUT_S, poll=0.05):
            return 1
        create_private_file(path, json.dumps({"url": url, "pid": os.getpid()}).encode(), True)
        print(f"local Prefect server on {url} (UI http://127.0.0.1:{port})", flush=True)
        while server.poll() is None:
            try:
                server.wait(timeout=min(kept.LOOK_EVERY_S, max(keep_s / 2, 0.5)))
            except subprocess.TimeoutExpired:
                idle = kept.idle_s(path)
                if idle > keep_s and kept.unused(home / USE) and not _active_flow_runs(url, secret):
                    print(f"unused for {idle:.0f} s: stopping", flush=True)
                    server.terminate()
        return 0
    finally:
        kept.forget_address(path)
        prefect_server.stop(server, 30)


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])))
