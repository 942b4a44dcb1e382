"""The watcher's state (``calypso watch``): which acquisitions were announced to Prefect,
when, under which event; shared by the watchers of one machine, kept across restarts.

Each acquisition is one outbox entry: *claimed* with its event (one transaction), then
*emitted* once the event is posted, then *confirmed* once a flow run processed it. A
watcher killed between claiming and posting leaves the entry claimed, with its event:
the next watcher to start (or any running one, a while later) posts it. An announcement
is delayed by a crash, never lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from calypso.errors import ConfigurationError
from calypso.registry.sqlite import connect, create_database


def deployment_of(event: dict | None) -> str | None:
    """The deployment an event triggers (its name): the technique, or the saved flow."""
    if not event:
        return None
    return event["resource"].get("calypso.flow") or event["resource"]["calypso.technique"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS acquisitions (
    key TEXT PRIMARY KEY,
    raw_dataset TEXT NOT NULL,
    scans TEXT,
    technique TEXT NOT NULL,
    flow_version TEXT NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'claimed',
    claimed TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    emitted TEXT,
    event TEXT,
    deployment TEXT,
    posted REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""


class WatchState:
    """What has been announced already: survives restarts, shared by local watchers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_database(
            path,
            _SCHEMA,
            ConfigurationError,
            "the watcher's state",
            "set CALYPSO_WATCH__STATE_PATH to a writable file",
            name="watch state",
            setting="CALYPSO_WATCH__STATE_PATH",
        )

    def _connect(self):
        return connect(self.path)

    def claim(
        self, acquisition: Any, key: str, version: str, event_id: str, event: dict | None = None
    ) -> bool:
        """True if this watcher is the one to announce ``key`` (now or again after a
        failed post); ``acquisition`` names the raw dataset, scans and technique. The
        ``event`` is kept with the claim: whoever finds it unposted posts it."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT state, event FROM acquisitions WHERE key = ?", (key,)
            ).fetchone()
            # claimed without its event: by a watcher older than the outbox, which died
            orphan = row is not None and row[0] == "claimed" and row[1] is None
            if row is not None and row[0] != "failed" and not orphan:
                return False
            db.execute(
                "INSERT OR REPLACE INTO acquisitions (key, raw_dataset, scans, technique, "
                "flow_version, event_id, event, deployment, posted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    acquisition.raw_dataset_dir,
                    json.dumps(acquisition.scans),
                    acquisition.technique,
                    version,
                    event_id,
                    json.dumps(event) if event else None,
                    deployment_of(event),
                    time.time(),
                ),
            )
            return True

    def pending(self, stale_after_s: float) -> list[tuple[str, dict]]:
        """(key, event) of announcements claimed but not posted: a post that failed, or a
        claim older than ``stale_after_s`` (its watcher was killed before posting). Taken
        by this watcher (their time renewed), so a running one does not post them too."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT key, event FROM acquisitions WHERE event IS NOT NULL AND "
                "(state = 'failed' OR (state = 'claimed' AND (posted IS NULL OR posted <= ?)))",
                (now - stale_after_s,),
            ).fetchall()
            db.executemany(
                "UPDATE acquisitions SET state = 'claimed', posted = ? WHERE key = ?",
                [(now, row[0]) for row in rows],
            )
        return [(row[0], json.loads(row[1])) for row in rows]

    def settle(self, key: str, emitted: bool, event: dict | None = None) -> None:
        with self._connect() as db:
            if emitted:
                db.execute(
                    "UPDATE acquisitions SET state = 'emitted', event = ?, deployment = ?, "
                    "posted = ?, attempts = attempts + 1, "
                    "emitted = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE key = ?",
                    (json.dumps(event), deployment_of(event), time.time(), key),
                )
            else:
                db.execute("UPDATE acquisitions SET state = 'failed' WHERE key = ?", (key,))

    def unconfirmed(self, older_than_s: float) -> list[tuple[str, dict, str, int]]:
        """(key, event, deployment, attempts) of announcements with no flow run seen after
        ``older_than_s``; taken by this watcher (the next look is due a period later), so
        two watchers sharing the state never post the same one again together."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT key, event, deployment, attempts FROM acquisitions "
                "WHERE state = 'emitted' AND posted < ?",
                (now - older_than_s,),
            ).fetchall()
            db.executemany(
                "UPDATE acquisitions SET posted = ? WHERE key = ?", [(now, r[0]) for r in rows]
            )
        return [(r[0], json.loads(r[1]), r[2], r[3]) for r in rows]

    def mark(self, key: str, state: str) -> None:
        """``confirmed`` (processed), ``processing-failed`` (its run failed: fix, rerun by
        hand) or ``unconfirmed`` (no run after every attempt)."""
        with self._connect() as db:
            db.execute("UPDATE acquisitions SET state = ? WHERE key = ?", (state, key))

    def states(self) -> dict[str, int]:
        """How many announcements are in each state."""
        with self._connect() as db:
            rows = db.execute("SELECT state, count(*) FROM acquisitions GROUP BY state")
            return {row[0]: row[1] for row in rows}

    def emitted(self) -> list[tuple[str, str, str]]:
        """(raw dataset, scans, technique) of every acquisition announced."""
        with self._connect() as db:
            return db.execute(
                "SELECT raw_dataset, scans, technique FROM acquisitions WHERE state = 'emitted' "
                "ORDER BY emitted"
            ).fetchall()
