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

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


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


@contextmanager
def ctrl_c_handler_kept() -> Iterator[None]:
    """The process's Ctrl-C handler restored after the block (in the main thread, where
    handlers are set). dask-jobqueue replaces it with ``sys.exit()`` as its runner module
    is imported: a Ctrl-C then ended a SLURM command with exit status 0 and no word, and
    reached ``calypso serve`` wherever its main thread was, its stop request bypassed."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def taking_ctrl_c() -> None:
    """Take Ctrl-C again in a process started under :func:`ctrl_c_left_to_this_process`
    that should stop with the command's terminal (a served flow run)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class StopRequest:
    """Ctrl-C and SIGTERM taken as a request to stop, acted on where the command is ready
    for it (:meth:`check`, :meth:`in_loop`), never as an exception raised wherever its main
    thread happens to be. A long-running command's Ctrl-C, raised as Python raises it, landed
    at random in what it was starting: inside a SQLite transaction ("cannot rollback - no
    transaction is active", exit 5), wrapped into one of pydantic's schema errors (a
    traceback), or as a cancellation that Prefect's starting runner absorbed (the command
    served on; once in ~70 tries under load). A second request stops the command at once
    (KeyboardInterrupt), as a second Ctrl-C would be expected to.

    Use it as a context: the signals' handlers are this object's inside it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._requested = False
        self.signal: int | None = None  # the signal that asked first (SIGINT: Ctrl-C)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._requested

    def __enter__(self) -> StopRequest:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._take)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def _take(self, number: int, frame: object = None) -> None:
        if self._requested:
            raise KeyboardInterrupt  # asked twice: at once
        self._requested, self.signal = True, number

    def check(self) -> None:
        """Raise KeyboardInterrupt, the command's way out on Ctrl-C, if a stop was asked."""
        if self._requested:
            raise KeyboardInterrupt

    @contextmanager
    def in_loop(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Iterator[None]:
        """Meanwhile a request calls ``stop`` in ``loop`` (on the loop's thread, which it wakes
        whichever thread the signal reached: a Python handler alone waits for the loop's next
        timer), as soon as it comes; one made before calls it at once."""

        def take(number: int) -> None:
            self._take(number)  # asked twice: out of the loop at once (KeyboardInterrupt)
            stop()

        for number in self.SIGNALS:
            loop.add_signal_handler(number, take, number)
        try:
            if self._requested:
                loop.call_soon(stop)
            yield
        finally:
            for number in self.SIGNALS:
                loop.remove_signal_handler(number)
                signal.signal(number, self._take)
