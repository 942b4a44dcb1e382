"""Prefect's server as the child of a Calypso process, gone with that process however it ends.

``python -m calypso.flows.prefect_server UVICORN-ARGUMENTS``: ``uvicorn`` with the same
arguments, plus a thread that stops the server (as SIGTERM does) once the process that
started it has gone. A command's temporary server and the local server's keeper
(:mod:`calypso.flows.local_server`) start it this way: a process killed with SIGKILL
cannot stop its server itself, and left alone the server (Prefect's own ephemeral one has
the same flaw) would run until the machine restarts. Kept free of Calypso's other
modules: it starts no slower than ``uvicorn`` itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

LOOK_EVERY_S = 0.5
PARENT = "CALYPSO_SERVER_PARENT"  # the pid of the process that starts the server


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(LOOK_EVERY_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown


def main() -> None:
    # The starter says who it is: one killed before this line runs has already left this
    # process to another parent (init, or a subreaper), which must not pass for it.
    parent = int(os.environ.pop(PARENT, os.getppid()))
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    from uvicorn.main import main as uvicorn

    uvicorn(sys.argv[1:], prog_name="uvicorn")


if __name__ == "__main__":
    main()
