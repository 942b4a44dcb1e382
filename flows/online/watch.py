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

from calypso.errors import CalypsoError
from calypso.flows.online.acquisitions import (
    Acquisition,
    bliss_files,
    finished_acquisitions,
    require_inside_roots,
)
from calypso.flows.techniques import TECHNIQUES
from calypso.registry.watch_state import WatchState
from calypso.settings import CalypsoSettings

logger = logging.getLogger("calypso.watch")


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
