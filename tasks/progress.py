"""Progress of work inside a flow run: a Prefect progress artifact in the UI, and
whatever listeners the CLI installed (a terminal bar); results of submitted tasks
collected as they finish.

The listeners belong to a thread, not to a context variable: Prefect runs the
flow function in a context of its own, where the CLI's context variables are
not set, but in the thread that called the flow. Keyed by thread, flow runs that
``calypso serve`` runs side by side for several commands each report to their
own command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

Listener = Callable[[int, int], None]
Result = TypeVar("Result")
_listeners: dict[int, list[Listener]] = {}
logger = logging.getLogger(__name__)
# Each artifact update is a request the flow's thread waits for: a run of a thousand
# chunks updated its bar a thousand times. The UI is not read faster than this.
ARTIFACT_UPDATE_S = 1.0


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send progress reports of flows run inside this block to ``listener(done, total)``."""
    here = _listeners.setdefault(threading.get_ident(), [])
    here.append(listener)
    try:
        yield
    finally:
        here.remove(listener)
        if not here:
            _listeners.pop(threading.get_ident(), None)


class RunProgress:
    """Counts finished work units and reports them as they finish: to the listeners at
    once, to the Prefect UI's progress artifact at most every ``ARTIFACT_UPDATE_S`` (and
    at the end). ``artifact=False``: work done in one piece has no bar in the UI (the
    run's state says it all, and the artifact's two requests cost a small run ~0.1 s)."""

    def __init__(
        self, total: int, description: str, notify: bool = True, artifact: bool = True
    ) -> None:
        self.total = max(total, 1)
        self.done = 0
        # The listeners of the thread running the flow, even when work is reported later
        # from another thread.
        self._listeners = _listeners.get(threading.get_ident(), []) if notify else []
        self._artifact: Any = None
        self._updated = time.monotonic()
        if artifact:
            try:
                self._artifact = create_progress_artifact(
                    progress=0.0, key=None, description=description
                )
            except Exception:  # no API to report to: the run itself must not fail for that
                logger.debug("progress artifact not created", exc_info=True)
        self._notify()

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        due = self.done >= self.total or now - self._updated >= ARTIFACT_UPDATE_S
        if self._artifact is not None and due:
            self._updated = now
            try:
                update_progress_artifact(self._artifact, progress=100.0 * self.done / self.total)
            except Exception:
                logger.debug("progress artifact not updated", exc_info=True)
        self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener(self.done, self.total)


def collect(
    futures: Iterable[PrefectFuture[Result]],
    total: int,
    description: str,
    size: Callable[[Result], int],
) -> list[Result]:
    """Results of submitted tasks as they finish, reporting ``size(result)`` units each."""
    return list(AsTheyFinish(futures, total, description, size))


class AsTheyFinish(Generic[Result]):
    """Results of submitted tasks, given as they finish, each reported as
    ``size(result)`` units of progress: a step that takes them one by one (the writer
    assembling a map of spectra) works on the first while the others are computed.

    Iterated again, it gives those that finished, then waits for the rest.
    ``finished(results)`` is called once, after the last has been given. A plain class, not
    a collection: Prefect passes it to a task as it is, without waiting for its futures.
    """

    def __init__(
        self,
        futures: Iterable[PrefectFuture[Result]],
        total: int,
        description: str,
        size: Callable[[Result], int],
        finished: Callable[[list[Result]], None] | None = None,
    ) -> None:
        self._waiting = list(futures)
        self._size = size
        self._finished = finished
        self.results: list[Result] = []
        self._progress = RunProgress(total, description, artifact=len(self._waiting) > 1)

    def __len__(self) -> int:
        return len(self.results) + len(self._waiting)

    def __iter__(self) -> Iterator[Result]:
        yield from list(self.results)
        for future in as_completed(list(self._waiting)):
            result = future.result()
            self._waiting.remove(future)
            self.results.append(result)
            self._progress.advance(self._size(result))
            yield result
        if self._finished is not None:
            finished, self._finished = self._finished, None
            finished(self.results)
