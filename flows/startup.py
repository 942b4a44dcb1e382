"""A Calypso process's start: Python's cyclic garbage collector off while it imports.

Importing Prefect (and, in its server, Prefect's API: ~430,000 objects) makes the cyclic
collector run again and again over a heap that only grows: measured here, 0.5-0.6 s of the
2.5-3 s that ``import prefect.server.api.server`` takes, and a like share of a command's
own imports. What it would have freed meanwhile stays (frozen with the rest): the
server's resident memory is 173 MB against 162 MB with the collector on.

So a process that starts turns it off (:func:`collect_later`), and turns it back on once
its start-up is done (:func:`collect_from_now_on`): what exists then is frozen (never
scanned again, as the objects of imported modules live as long as the process), what
comes after is collected as usual. A process that never says it has started gets the
collector back after ``limit_s`` anyway: a long-lived command (``calypso serve``,
``calypso watch``) is not left without it. Kept free of Calypso's other modules: Prefect's
server process (:mod:`calypso.flows.prefect_server`) uses it before its first import.
"""

from __future__ import annotations

import gc
import threading

LIMIT_S = 15.0  # the collector is back on after this long, start-up done or not

_lock = threading.Lock()
_off = False


def collect_later(limit_s: float = LIMIT_S) -> None:
    """The cyclic garbage collector off until :func:`collect_from_now_on`, or ``limit_s``."""
    global _off
    with _lock:
        if _off or not gc.isenabled():
            return  # already off (by this module, or by whoever turned it off: theirs)
        _off = True
        gc.disable()
    timer = threading.Timer(limit_s, collect_from_now_on)
    timer.daemon = True
    timer.start()


def collect_from_now_on() -> None:
    """The start-up is done: its objects frozen, the collector back on (if
    :func:`collect_later` turned it off; called again, nothing)."""
    global _off
    with _lock:
        if not _off:
            return
        _off = False
        gc.freeze()
        gc.enable()
