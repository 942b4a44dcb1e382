"""The watcher's state (``calypso watch``): which acquisitions were announced to Prefect,
when, under which event; shared by the watchers of one machine, kept across restarts."""

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

    def claim(self, acquisition: Any, key: str, version: str, event_id: str) -> bool:
        """True if this watcher is the one to announce ``key`` (now or again after a
        failed post); ``acquisition`` names the raw dataset, scans and technique."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state FROM acquisitions WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] != "failed":
                return False
            db.execute(
                "INSERT OR REPLACE INTO acquisitions "
                "(key, raw_dataset, scans, technique, flow_version, event_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key,
                    acquisition.raw_dataset_dir,
                    json.dumps(acquisition.scans),
                    acquisition.technique,
                    version,
                    event_id,
                ),
            )
            return True

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
        with self._connect() as db:
            db.execute("UPDATE acquisitions SET state = ? WHERE key = ?", (state, key))

    def emitted(self) -> list[tuple[str, str, str]]:
        """(raw dataset, scans, technique) of every acquisition announced."""
        with self._connect() as db:
            return db.execute(
                "SELECT raw_dataset, scans, technique FROM acquisitions WHERE state = 'emitted' "
                "ORDER BY emitted"
            ).fetchall()
