"""Ctrl-C for the command, not for the processes it starts.

A terminal sends Ctrl-C (SIGINT) to every process of its foreground group: the command,
and the Dask workers, fork servers and the temporary Prefect server it started. Each of
those then stopped on its own, printing a traceback (mid-import, for one still
starting), and a temporary server gone first left the command retrying its last
reports against it for a minute or more. Processes started under
:func:`ctrl_c_left_to_this_process` have SIGINT blocked (a blocked signal is inherited by
threads and child processes, across ``exec``): the command, which alone takes it, stops
them in order.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_left_to_this_process(multiprocessing: bool = True) -> Iterator[None]:
    """Start processes and threads meanwhile that leave Ctrl-C to this one; a Ctrl-C that
    comes meanwhile is taken by this thread as the block ends. ``multiprocessing``: the
    processes are started by :mod:`multiprocessing` (Dask's workers, a fork server)."""
    if multiprocessing:
        from multiprocessing import resource_tracker

        # Started now: the thread that starts it unblocks SIGINT for itself after (the
        # standard library's own doing), and Dask's loop thread would start it, then its
        # workers, with Ctrl-C.
        resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def taking_ctrl_c() -> None:
    """Take Ctrl-C again in a process started under :func:`ctrl_c_left_to_this_process`
    that should stop with the command's terminal (a served flow run)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
