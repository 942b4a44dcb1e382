"""Flow runs that ``calypso serve`` starts begin warm: forked, not spawned (issue #18).

Prefect's runner starts each flow run of a deployment in a fresh Python process, which
imports Prefect, Dask, pyFAI and the technique's code before its first step: 4-5 s on
this machine, twice that under load, for every triggered run, while the run itself of a
small dataset takes a second or two. ``calypso serve`` therefore hands its runner the
flows themselves (so it starts them with Prefect's in-memory starter) and has that
starter create processes from a *fork server* that imported all of this once, at
serve's start. Each run still gets a process of its own, created from a clean,
single-threaded parent: a run that is killed or crashes is reported by the runner as
before, and takes nothing else down.

Prefect's in-memory starter (``prefect.runner._starter_direct``) is documented as the
place to patch its process creation; Calypso wraps its ``run_flow_in_subprocess`` so
that the multiprocessing context Prefect asks for is the fork server, and leaves the
rest of Prefect's process set-up (environment, settings, signal handling) as it is.
Where a Prefect version lays this out differently, serve logs a warning and its runs
start cold, as before.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("calypso.serve")

# What every served flow run imports, whatever its technique: the engine and Prefect's,
# and the quick look's drawing code (matplotlib: ~2 s to import on a loaded machine, paid
# after the last frame by every run that writes a quick look, live runs included).
ALWAYS = (
    "prefect.flow_engine",
    # What Prefect imports inside a flow's call (its parameters' validation, and a check
    # for a graph being drawn): ~0.25 s.
    "fastapi.encoders",
    "prefect.utilities.visualization",
    "calypso.flows.engine",
    "calypso.flows.user_flows",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)


def preloaded_modules(techniques: Iterable[Any]) -> list[str]:
    """The modules the fork server imports: Prefect's engine, Calypso's, and every module a
    run of ``techniques`` can import (flow, steps, planner, readers, writers)."""
    modules = dict.fromkeys(ALWAYS)
    for technique in techniques:
        modules.update(dict.fromkeys(sorted(technique.modules())))
    return list(modules)


def import_modules(modules: Iterable[str], until: Callable[[], bool] | None = None) -> None:
    """Import ``modules`` now (a command waiting for its Prefect server), stopping once
    ``until()`` is true (the server answers: the run then imports the rest as it needs
    them). One that fails is skipped, as the fork server's preload skips it: the run that
    needs it says why."""
    import importlib

    for module in modules:
        if until is not None and until():
            return
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional backend missing, say
            logger.debug("not imported ahead: %s (%s)", module, exc)


def start_warm(modules: list[str]) -> bool:
    """Make the served flow runs start from a fork server that imported ``modules``; the
    server is started now, in the background. False (and a warning) where this Prefect
    does not start in-memory flows the way Calypso expects."""
    try:
        from prefect import flow_engine
        from prefect.runner import _starter_direct
    except ImportError as exc:
        logger.warning("served runs start cold: %s", exc)
        return False
    cold = getattr(_starter_direct, "run_flow_in_subprocess", None)
    if cold is None or getattr(flow_engine, "multiprocessing", None) is not multiprocessing:
        logger.warning("served runs start cold: this Prefect starts flow runs differently")
        return False
    if getattr(cold, "calypso_warm", False):
        return True
    from calypso.executors.fork_server import fork_server_for

    if not fork_server_for(modules):
        logger.warning("served runs start cold: this process's fork server is another's")
        return False
    context = multiprocessing.get_context("forkserver")
    # Prefect asks its module-level `multiprocessing` for the "spawn" context: for the
    # duration of the call, that name answers with the fork server. The runner calls
    # this from its one event-loop thread, so the swap is never seen by anything else.
    # Its processes take Ctrl-C again, held back from the fork server (serve.py).
    shim = types.SimpleNamespace(get_context=lambda method=None: _TakingCtrlC(context))
    lock = threading.Lock()

    @functools.wraps(cold)
    def warm(*args: Any, **kwargs: Any):
        with lock:
            flow_engine.multiprocessing = shim
            try:
                return cold(*args, **kwargs)
            finally:
                flow_engine.multiprocessing = multiprocessing

    warm.calypso_warm = True  # type: ignore[attr-defined]
    _starter_direct.run_flow_in_subprocess = warm
    # The fork server imports everything once; start it now rather than in the first run.
    threading.Thread(target=_start_fork_server, args=(context,), daemon=True).start()
    logger.info("served runs start warm: a fork server imports %d modules", len(modules))
    return True


def _start_fork_server(context) -> None:
    began = time.monotonic()
    try:
        process = context.Process(target=int)
        process.start()
        process.join()
    except Exception as exc:  # the first run starts it then, or says why
        logger.warning("the fork server for served runs did not start: %s", exc)
        return
    # Runs triggered before this wait for it: said, so that a slow first run is explained.
    logger.info("the fork server for served runs is ready (%.1f s)", time.monotonic() - began)


class _TakingCtrlC:
    """A multiprocessing context whose processes unblock Ctrl-C as they start: the fork
    server they are forked from was started with it blocked, and a served run stopped by
    a Ctrl-C in serve's terminal (Prefect records it so) is stopped as before."""

    def __init__(self, context) -> None:
        self._context = context

    def Process(self, target=None, args=(), kwargs=None, **options):
        return self._context.Process(
            target=_taking_ctrl_c, args=(target, *args), kwargs=kwargs or {}, **options
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _taking_ctrl_c(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from calypso.executors.interrupts import taking_ctrl_c

    taking_ctrl_c()
    return target(*args, **kwargs)
