"""A cold command's head start: its first chunks done while Prefect's server starts.

A command with no Prefect server to use starts one and waits for it (3-5 s on two cores)
before its flow run exists; meanwhile one core is idle. When its chunk tasks are to run
in the command's own threads (a technique with ``threaded_chunks``, a cluster of the
command's own), a :class:`HeadStart` does the plan's chunks in order in one thread of
the command, with the chunk tasks' own code, into a staging folder. When the flow's
chunk task for such a chunk runs, it takes the staged result (:func:`take`: its part
file moved into the run's work folder), or waits for the one in progress; the others it
does itself. The chunk task is still the run's task: Prefect records it and keeps its
result; only its work was done sooner. The head start begins no chunk once the flow's
tasks have started.

A chunk the head start failed is done again by its task, whose error is the run's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from calypso.executors.worker_setup import keep_one_share

logger = logging.getLogger(__name__)

_active: HeadStart | None = None  # the command's head start, while it runs
_active_lock = threading.Lock()


class HeadStart:
    """Does ``work(chunk, folder)`` for ``chunks`` in order in one thread, from ``with``
    until the first :func:`take` (then it finishes the chunk it is doing). ``inputs``:
    what the chunk tasks must also be given for their chunk to be taken (the plan's
    parameters ...); ``work`` returns a result with ``part_file`` inside ``folder``."""

    def __init__(
        self,
        work: Callable[[Any, str], BaseModel],
        chunks: Iterable[Any],
        key: Callable[[Any], Hashable],
        inputs: tuple[Any, ...],
    ) -> None:
        self._work, self._chunks, self._key, self.inputs = work, list(chunks), key, inputs
        self._lock = threading.Lock()
        self._begun: dict[Hashable, Future] = {}
        self._stopped = False  # a task has asked: no chunk is begun any more
        self._staging = Path(tempfile.mkdtemp(prefix="calypso-head-start-"))
        self._thread = threading.Thread(target=self._run, name="calypso-head-start", daemon=True)

    def __enter__(self) -> HeadStart:
        global _active
        with _active_lock:
            _active = self
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global _active
        with _active_lock:
            if _active is self:
                _active = None
        with self._lock:
            self._stopped = True
        if kind is None:  # on an interrupt, the daemon thread is left to the exit
            self._thread.join()
        shutil.rmtree(self._staging, ignore_errors=True)

    def _run(self) -> None:
        keep_one_share()  # beside Prefect's server as it starts: one core's worth
        for chunk in self._chunks:
            key = self._key(chunk)
            with self._lock:
                if self._stopped:
                    return
                done: Future = Future()
                self._begun[key] = done
            try:
                done.set_result(self._work(chunk, str(self._staging)))
            except BaseException as exc:  # its task does it again, and reports it
                done.set_exception(exc)

    def take(self, chunk: Any, inputs: tuple[Any, ...], work_dir: str) -> BaseModel | None:
        """The chunk's result, its part file moved into ``work_dir``, once the head start
        has done it; None when the task must do it (not begun, other inputs, failed)."""
        key = self._key(chunk)
        with self._lock:
            self._stopped = True
            done = self._begun.get(key)
        if done is None or inputs != self.inputs:
            return None
        try:
            result = done.result()
        except Exception as exc:
            logger.info("the head start's chunk %s failed (%s): its task does it", key, exc)
            return None
        part = Path(work_dir) / Path(result.part_file).name
        shutil.move(result.part_file, part)
        return result.model_copy(update={"part_file": str(part), "head_start": True})


def take(chunk: Any, inputs: tuple[Any, ...], work_dir: str) -> BaseModel | None:
    """The chunk task's result if this process's head start did it (:meth:`HeadStart.take`),
    else None: always None in a worker process or a served run."""
    with _active_lock:
        head_start = _active
    return None if head_start is None else head_start.take(chunk, inputs, work_dir)
