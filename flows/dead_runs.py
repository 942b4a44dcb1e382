"""Runs that died without a word, told as such (docs/operations/catalogue.md).

A flow run killed (SIGKILL, the machine gone, the portal or ``calypso serve`` that ran it
stopped) says nothing more: Prefect and the portal go on showing it Running, and its
catalogue record holds its folder until another run of the same folder takes it. Its
record's lease, renewed while it runs (``catalogue.lease_s``), is what says it died:
:func:`reap_dead_runs` releases what such runs hold (:func:`~calypso.registry.claims.
release_dead`) and marks their Prefect flow runs Crashed, with why. ``calypso serve`` and
the portal do it every half lease; ``calypso catalogue prune`` for the dataset it prunes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

from calypso.registry import claims, open_catalogue
from calypso.registry.catalogue import embedded
from calypso.settings import CalypsoSettings

logger = logging.getLogger(__name__)


def reap_dead_runs(
    settings: CalypsoSettings, folders: Collection[str] | None = None, dry_run: bool = False
) -> list[claims.Released]:
    """Release the catalogue records of runs whose lease ran out a lease ago or more (in
    ``folders``, or all) and mark their flow runs Crashed where Prefect still has them running
    (``dry_run``: only which they are)."""
    catalogue = embedded(open_catalogue(settings))
    # One more lease of grace: a run whose heartbeat a loaded machine starved is alive.
    lease = settings.catalogue.lease_s
    released = claims.release_dead(catalogue, folders, dry_run=dry_run, grace_s=lease)
    if dry_run:
        return released
    for dead in released:
        crashed = mark_crashed(dead.flow_run_id, dead.message)
        logger.warning(
            "record %s released: %s%s",
            dead.record_id,
            dead.message,
            "; its flow run is marked Crashed" if crashed else "",
        )
    return released


def mark_crashed(run_id: str, message: str) -> bool:
    """Mark flow run ``run_id`` Crashed, with ``message``, if Prefect's API (the one
    configured) has it not over yet; False when it is over, unknown or unreachable."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(run_id))
            if run.state is None or run.state.is_final():
                return False
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    except Exception as exc:  # no API here, a run it does not know: the record says it
        logger.debug("flow run %s not marked Crashed: %s", run_id, exc)
        return False
    return True


def reap_now_and_then(settings: CalypsoSettings, stop: threading.Event) -> threading.Thread:
    """:func:`reap_dead_runs` now, then every half lease, in a thread, until ``stop``."""

    def reap() -> None:
        while True:
            try:
                reap_dead_runs(settings)
            except Exception as exc:  # keep serving; say why
                logger.warning("dead runs not released: %s", exc)
            if stop.wait(settings.catalogue.lease_s / 2):
                return

    thread = threading.Thread(target=reap, name="calypso-dead-runs", daemon=True)
    thread.start()
    return thread
