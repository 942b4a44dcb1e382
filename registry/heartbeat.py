"""A flow run's heartbeat: renews its claim and reserved record (registry/claims.py) while
it lives; a run killed or vanished stops renewing them, and its lease runs out."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING

from calypso.errors import CatalogueError
from calypso.registry.claims import transaction

if TYPE_CHECKING:
    from calypso.registry.catalogue import SQLiteCatalogue

log = logging.getLogger(__name__)


def renew(
    catalogue: SQLiteCatalogue,
    run_id: str,
    key: str | None,
    record_id: int | None,
    lease_s: float,
) -> str | None:
    """Extend a run's claim and reservation by ``lease_s`` from now; None, or who holds
    them now (the run was thought dead and another took over)."""
    until = time.time() + lease_s
    with transaction(catalogue) as db:
        if record_id is not None:
            renewed = db.execute(
                "UPDATE processed_datasets SET lease_expires = ? WHERE id = ? "
                "AND flow_run_id = ? AND status IN ('running', 'publishing')",
                (until, record_id, run_id),
            ).rowcount
            if not renewed:
                row = db.execute(
                    "SELECT status FROM processed_datasets WHERE id = ?", (record_id,)
                ).fetchone()
                if row is None or row["status"] == "failed":
                    return f"another run (record {record_id} is {row and row['status']})"
        if key:
            db.execute(
                "UPDATE claims SET expires = ? WHERE key = ? AND flow_run_id = ? "
                "AND state = 'running'",
                (until, key, run_id),
            )
            row = db.execute("SELECT flow_run_id FROM claims WHERE key = ?", (key,)).fetchone()
            if row is None or row["flow_run_id"] != run_id:
                return f"flow run {row['flow_run_id']}" if row is not None else "nobody"
    return None


class Heartbeat:
    """Renews a flow run's claim and reserved record every quarter lease, in a daemon
    thread, until stopped (or the run is gone: the thread holds it weakly). ``lost`` says
    who holds them if the run was thought dead and another took over."""

    def __init__(
        self,
        catalogue: SQLiteCatalogue,
        run_id: str,
        key: str | None,
        record_id: int | None,
        lease_s: float,
    ) -> None:
        self.lost: str | None = None
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_beat,
            args=(weakref.ref(self), self._stop, catalogue, run_id, key, record_id, lease_s),
            name=f"calypso-lease-{(run_id or uuid.uuid4().hex)[:8]}",
            daemon=True,
        )

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _beat(me, stop, catalogue, run_id, key, record_id, lease_s) -> None:
    while not stop.wait(lease_s / 4):
        heartbeat = me()
        if heartbeat is None:  # the run is gone without stopping it
            return
        try:
            lost = renew(catalogue, run_id, key, record_id, lease_s)
        except CatalogueError as exc:  # busy: the next beat tries again, within the lease
            log.warning("flow run %s: lease not renewed: %s", run_id, exc)
            continue
        heartbeat.beats += 1
        if lost is not None:
            heartbeat.lost = lost
            log.warning("flow run %s: its claim or record is now held by %s", run_id, lost)
            return
