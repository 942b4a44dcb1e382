"""Prefect's flow-run heartbeats, stopped the moment a run ends.

Prefect (3.9) sends a flow run's heartbeats from a thread that sleeps in steps of one
second, and the run's end waits for that thread (``join``): every run, however short,
paid up to a second at its end (0.5 s on average, the wait of a run sent to ``calypso
serve`` and of each test run). :func:`end_heartbeats_with_the_run` puts in its place a
heartbeat thread that sends the same events at the same interval but waits on the stop
signal itself, so the run ends at once. Where a Prefect version lays the heartbeats out
differently (the names below missing), Prefect's own are kept.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any


def end_heartbeats_with_the_run() -> None:
    """Use :func:`_send_heartbeats` for the flow runs of this process (idempotent)."""
    from prefect import flow_engine

    current = getattr(flow_engine, "_send_heartbeats", None)
    engine = getattr(flow_engine, "BaseFlowRunEngine", None)
    expected = ("_build_heartbeat_event_template", "_emit_flow_run_heartbeat")
    if current is None or engine is None or not all(hasattr(engine, n) for n in expected):
        return  # another layout: Prefect's heartbeats as they are
    if current is not _send_heartbeats:
        flow_engine._send_heartbeats = _send_heartbeats


@contextmanager
def _send_heartbeats(engine: Any, join_on_exit: bool = True) -> Generator[None, None, None]:
    """Prefect's heartbeat context (same events, same interval), ended without a wait."""
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    seconds = max(seconds, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run is not None and run.state is not None and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)

    # The thread sees this context's Prefect settings (its API URL), as Prefect's does.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)
