"""Flow-run heartbeats (flows/heartbeats.py): still sent to the Prefect server, and a
run's end no longer waits for the heartbeat thread's second-long sleep."""

from __future__ import annotations

import threading
import time

from tests.processes import wait_until


def heartbeats_of(flow_run_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    query = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            "occurred": {"since": "2000-01-01T00:00:00Z"},
        },
        "limit": 10,
    }
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/events/filter", json=query)
        return response.json()["events"]


def test_a_run_sends_its_heartbeat_and_ends_without_waiting_for_the_thread():
    from prefect import flow, flow_engine
    from prefect.context import get_run_context

    import calypso.flows.engine  # noqa: F401  (installs the heartbeats)
    from calypso.flows.heartbeats import _send_heartbeats

    assert flow_engine._send_heartbeats is _send_heartbeats
    beating: list[threading.Thread] = []

    @flow(persist_result=False)
    def short() -> str:
        time.sleep(0.3)  # the heartbeat thread has sent its first beat and waits
        beating.extend(t for t in threading.enumerate() if _is_heartbeat(t))
        return str(get_run_context().flow_run.id)

    flow_run_id = short()
    # The heartbeat thread ran during the run and is gone once it returned: stopped and
    # joined at the run's end, not left sleeping.
    assert len(beating) == 1 and not beating[0].is_alive()
    beats = wait_until(lambda: heartbeats_of(flow_run_id), 30, "the run's heartbeat event")
    assert beats[0]["resource"]["prefect.resource.id"] == f"prefect.flow-run.{flow_run_id}"


def _is_heartbeat(thread: threading.Thread) -> bool:
    arguments = getattr(thread, "_args", ())
    return bool(arguments) and getattr(arguments[0], "__qualname__", "").endswith(".beat")
