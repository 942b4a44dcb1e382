"""``calypso watch ROOT...``: emit an acquisition event for every finished scan.

The watcher polls the trees (GPFS and NFS do not tell inotify about other
clients' writes), decides the technique of each finished scan from the
beamline's rules, and posts ``calypso.acquisition.completed`` to the Prefect
server; the deployments of ``calypso serve`` are triggered by it.

Exactly once: every acquisition has a processing key (dataset, scans, technique,
flow version, parameters). The watcher claims the key in its SQLite state before
posting (several watchers on one machine share it; a restarted watcher finds
it), and the event id is derived from the key, so Prefect accepts a duplicate
posted by a watcher elsewhere once. The flow run claims the key again in the
catalogue: a duplicate that still gets through finds the work done.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from calypso.errors import CalypsoError, ConfigurationError
from calypso.flows.techniques import TECHNIQUES
from calypso.registry.catalogue import connect, create_database
from calypso.settings import CalypsoSettings
from calypso.tasks.acquisitions import (
    Acquisition,
    bliss_files,
    finished_acquisitions,
    require_inside_roots,
)

logger = logging.getLogger("calypso.watch")

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
        )

    def _connect(self):
        return connect(self.path)

    def claim(self, acquisition: Acquisition, key: str, version: str, event_id: str) -> bool:
        """True if this watcher is the one to announce ``key`` (now or again after a
        failed post)."""
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
                    (json.dumps(event), _deployment_of(event), time.time(), key),
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


def _deployment_of(event: dict | None) -> str | None:
    """The deployment an event triggers (its name): the technique, or the saved flow."""
    if not event:
        return None
    return event["resource"].get("calypso.flow") or event["resource"]["calypso.technique"]


def flow_runs_with_key(api_url: str, deployment: str, key: str, timeout_s: float = 10.0) -> int:
    """How many runs of ``deployment`` carry the processing ``key`` (``trigger``)."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/flow_runs/filter",
        data=json.dumps(
            {
                "deployments": {"name": {"any_": [deployment]}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 200,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        runs = json.loads(response.read())
    return sum(1 for run in runs if (run.get("parameters") or {}).get("trigger") == key)


def post_event(api_url: str, event: dict, timeout_s: float = 10.0) -> None:
    """``POST /api/events``: how any acquisition system can announce a scan too."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/events",
        data=json.dumps([event]).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if response.status >= 300:
            raise OSError(f"HTTP {response.status}")


@dataclass
class Watcher:
    roots: list[Path]
    settings: CalypsoSettings
    api_url: str
    state: WatchState = field(init=False)
    _unchanged: dict[Path, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.state = WatchState(self.settings.watch_state_path)
        self.versions = {name: technique.version for name, technique in TECHNIQUES.items()}

    def poll(self) -> list[Acquisition]:
        """One pass over the trees; returns the acquisitions announced."""
        announced = []
        for root in self.roots:
            for bliss_file in bliss_files(root):
                try:
                    announced += self._look_at(bliss_file)
                except CalypsoError as exc:  # said once, until the file changes
                    if bliss_file not in self._unchanged:
                        logger.warning("rejected %s: %s", bliss_file, exc)
                    self._unchanged[bliss_file] = bliss_file.stat().st_mtime
                except Exception as exc:  # a file being written, a vanished folder ...
                    logger.debug("%s not readable yet: %s", bliss_file, exc)
        return announced

    def _look_at(self, bliss_file: Path) -> list[Acquisition]:
        changed = bliss_file.stat().st_mtime
        if self._unchanged.get(bliss_file) == changed:
            return []  # fully announced and not touched since
        require_inside_roots(bliss_file, self.roots)
        ready, waiting = finished_acquisitions(bliss_file, self.settings.watch)
        announced = []
        for acquisition in ready:
            if acquisition.saved_flow:
                version = self._saved_flow_version(acquisition.saved_flow)
                if version is None:
                    logger.warning(
                        "rejected %s: no saved flow %r (rules of beamline %s); "
                        "`calypso flows list` shows them",
                        acquisition.raw_dataset_dir,
                        acquisition.saved_flow,
                        acquisition.beamline,
                    )
                    continue
                if self._announce(acquisition, version):
                    announced.append(acquisition)
                continue
            if acquisition.technique not in TECHNIQUES:
                logger.warning(
                    "rejected %s: unknown technique %r in the rules of beamline %s (known: %s)",
                    acquisition.raw_dataset_dir,
                    acquisition.technique,
                    acquisition.beamline,
                    ", ".join(TECHNIQUES),
                )
                continue
            if self._announce(acquisition, self.versions[acquisition.technique]):
                announced.append(acquisition)
        if not waiting:
            self._unchanged[bliss_file] = changed
        return announced

    def _saved_flow_version(self, name: str) -> str | None:
        """``flow:NAME@V`` of the latest version: a new version processes again."""
        from calypso.errors import CatalogueError
        from calypso.registry.saved_flows import SavedFlows

        try:
            return f"flow:{SavedFlows(self.settings.catalogue_path).get(name).label}"
        except CatalogueError:
            return None

    def _announce(self, acquisition: Acquisition, version: str) -> bool:
        event = acquisition.event(version)
        key = event["payload"]["key"]
        if not self.state.claim(acquisition, key, version, event["id"]):
            return False
        try:
            post_event(self.api_url, event)
        except (OSError, urllib.error.URLError) as exc:
            self.state.settle(key, emitted=False)
            logger.warning(
                "could not post the event for %s (%s): retried next poll",
                acquisition.raw_dataset_dir,
                exc,
            )
            return False
        self.state.settle(key, emitted=True, event=event)
        scans = ",".join(map(str, acquisition.scans)) if acquisition.scans else "all scans"
        logger.info(
            "%s %s -> %s (event %s)",
            acquisition.raw_dataset_dir,
            scans,
            acquisition.technique,
            event["id"],
        )
        return True

    def confirm(self) -> None:
        """Check that each announcement started a flow run; post again the ones that did
        not (a server can lose an event under load): under a new event id, since Prefect
        drops ids it has seen, and safely, since the run claims the key in the catalogue."""
        watch = self.settings.watch
        for key, event, deployment, attempts in self.state.unconfirmed(watch.confirm_s):
            try:
                found = flow_runs_with_key(self.api_url, deployment, key)
            except (OSError, ValueError) as exc:
                logger.debug("cannot look for the runs of %s: %s", key, exc)
                return
            if found:
                self.state.mark(key, "confirmed")
                continue
            if attempts >= watch.attempts:
                self.state.mark(key, "unconfirmed")
                logger.error(
                    "no flow run started for %s after %d events: is `calypso serve` running "
                    "and its %s deployment's trigger enabled?",
                    event["payload"]["raw"],
                    attempts,
                    deployment,
                )
                continue
            event = event | {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key}#{attempts}"))}
            try:
                post_event(self.api_url, event)
            except OSError as exc:
                logger.warning("could not post again the event for %s: %s", key, exc)
                return
            self.state.settle(key, emitted=True, event=event)
            logger.warning("no flow run yet for %s: event posted again", event["payload"]["raw"])

    def run(self, once: bool = False) -> None:
        while True:
            began = time.monotonic()
            self.poll()
            self.confirm()
            if once:
                return
            time.sleep(max(0.0, self.settings.watch.interval_s - (time.monotonic() - began)))
