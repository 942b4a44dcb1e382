"""``calypso watch ROOT...``: emit an acquisition event for every finished scan.

The watcher polls the trees (GPFS and NFS do not tell inotify about other
clients' writes), decides the technique of each finished scan from the
beamline's rules, and posts ``calypso.acquisition.completed`` to the Prefect
server; the deployments of ``calypso serve`` are triggered by it.

Exactly once: every acquisition has a processing key (canonical dataset path,
scans, technique, flow version, parameters). The watcher claims the key in its
SQLite state together with the event, then posts it, then confirms it: an outbox
(several watchers on one machine share it; a watcher killed between claiming and
posting leaves the event there, and the next watcher to start posts it). The
event id is derived from the key, so Prefect accepts a duplicate posted by a
watcher elsewhere once. The flow run claims the key again in the catalogue, as
a lease its heartbeat keeps: a duplicate that still gets through finds the work
done, or being done by a live run.

Confirmed means processed: a run that completed with its record (the claim is
``done``). A run still working with a live lease, or a run waiting to start, is
looked at again later; a run that failed is reported (a second run would fail
the same way); a run that crashed, was killed or vanished (its lease ran out)
gets the acquisition announced again, and the next run takes the claim over.

With a blissdata server (``--blissdata``), a scan is also announced when it starts, to a
live run (:mod:`calypso.flows.online.scan_starts`), under the same key: at its end it is
confirmed if the live run processed it, and announced as finished only if that run
crashed, failed or never started.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from calypso.errors import CalypsoError
from calypso.executors.interrupts import StopRequest
from calypso.flows.online.acquisitions import (
    Acquisition,
    bliss_files,
    finished_acquisitions,
    is_live,
    live_deployment,
    require_inside_roots,
)
from calypso.flows.online.file_changes import listen
from calypso.flows.online.live_base import LIVE_TECHNIQUES
from calypso.flows.runtime import prefect_auth_headers
from calypso.flows.techniques import TECHNIQUES
from calypso.registry.claims import Claim, processing_claim
from calypso.registry.sqlite import connect
from calypso.registry.watch_state import WatchState
from calypso.settings import CalypsoSettings

logger = logging.getLogger("calypso.watch")


def deployments_for(deployment: str) -> list[str]:
    """The deployments whose runs may process an announcement of ``deployment``: a
    technique fed live has its live deployment too (the run started at the scan's start)."""
    return (
        [deployment, live_deployment(deployment)] if deployment in LIVE_TECHNIQUES else [deployment]
    )


def flow_runs_with_key(
    api_url: str, deployments: list[str], key: str, timeout_s: float = 10.0
) -> list[tuple[str, str]]:
    """(flow run id, state type) of the runs of ``deployments`` that carry the processing
    ``key`` (``trigger``), newest first."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/flow_runs/filter",
        data=json.dumps(
            {
                "deployments": {"name": {"any_": deployments}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 200,
            }
        ).encode(),
        headers={"Content-Type": "application/json", **prefect_auth_headers()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        runs = json.loads(response.read())
    return [
        (run["id"], (run.get("state") or {}).get("type") or "PENDING")
        for run in runs
        if (run.get("parameters") or {}).get("trigger") == key
    ]


_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A live announcement with no flow run this long after it was posted: none will come (no
# serve serves the live deployment, or the server lost the event); the scan's end is
# announced instead. Prefect makes a run of an event within a second or two, unless loaded.
LIVE_START_GRACE_S = 30.0
STOP_SEEN_S = 0.5  # how soon a Ctrl-C (SIGTERM) is acted on while the watcher waits


def verdict(claim: Claim | None, runs: list[tuple[str, str]], now: float | None = None) -> str:
    """What an announcement's flow runs (id, state type) and the catalogue's claim on its
    key say: ``done`` (a run completed with its record), ``wait`` (a run works with a live
    lease, or waits to start), ``failed`` (the run failed: not posted again, a second run
    would fail the same way) or ``again`` (crashed, cancelled, killed or vanished, or no
    run at all: post it again, the next run takes the claim over)."""
    if claim is not None and claim.state == "done":
        return "done"
    states = dict(runs)
    holder = states.get(claim.flow_run_id) if claim is not None else None
    if claim is not None and claim.live(now) and holder not in _FINAL:
        return "wait"
    dead = claim.flow_run_id if claim is not None and claim.state == "running" else None
    if any(state not in _FINAL for run, state in runs if run != dead):
        return "wait"  # scheduled, pending, or starting (not claimed yet)
    if claim is None:
        if "COMPLETED" in states.values():
            return "done"  # a catalogue this watcher does not see recorded it
        return "failed" if "FAILED" in states.values() else "again"
    if claim.state == "failed" or holder == "FAILED":
        return "failed"
    return "again"


def post_event(api_url: str, event: dict, timeout_s: float = 10.0) -> None:
    """``POST /api/events``: how any acquisition system can announce a scan too."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/events",
        data=json.dumps([event]).encode(),
        headers={"Content-Type": "application/json", **prefect_auth_headers()},
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
    # Dataset files to look at before the next poll (from other threads: the ones inotify
    # saw change, those of scans blissdata says ended).
    _soon: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, init=False)
    _stop: StopRequest | None = field(default=None, init=False)  # run's, taken between looks

    def __post_init__(self) -> None:
        from calypso.registry.access import require_data_roots

        require_data_roots(self.settings, "calypso watch", self.roots)  # fail closed (#20)
        self.state = WatchState(self.settings.watch_state_path)
        self.versions = {name: technique.version for name, technique in TECHNIQUES.items()}

    def poll(self) -> list[Acquisition]:
        """One pass over the trees; returns the acquisitions announced."""
        announced = []
        for root in self.roots:
            for bliss_file in bliss_files(root):
                self._stop_if_asked()
                announced += self.look_at(bliss_file)
        return announced

    def look_at(self, bliss_file: Path) -> list[Acquisition]:
        """Announce what one dataset file has ready; what it announced."""
        try:
            return self._look_at(bliss_file)
        except CalypsoError as exc:  # said once, until the file changes
            if bliss_file not in self._unchanged:
                logger.warning("rejected %s: %s", bliss_file, exc)
            self._unchanged[bliss_file] = bliss_file.stat().st_mtime
        except Exception as exc:  # a file being written, a vanished folder ...
            logger.debug("%s not readable yet: %s", bliss_file, exc)
        return []

    def look_soon(self, bliss_file: Path) -> None:
        """Look at ``bliss_file`` now, not at the next poll (called from another thread:
        inotify saw it change, or blissdata says a scan of it ended; the loop looks)."""
        self._soon.put(bliss_file)

    def _look_at(self, bliss_file: Path) -> list[Acquisition]:
        changed = bliss_file.stat().st_mtime
        if self._unchanged.get(bliss_file) == changed:
            return []  # fully announced and not touched since
        require_inside_roots(bliss_file, self.roots)
        ready, waiting, started = finished_acquisitions(bliss_file, self.settings.watch)
        for acquisition in started:  # scans being written: their live runs (live_from_files)
            self.announce_live(acquisition, "files", "")
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
            done = self._announce(acquisition, self.versions[acquisition.technique])
            if done is None:  # its live run is finishing it: looked at again next poll
                waiting.append(f"{bliss_file}: its live run is still working")
            elif done:
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

    def _announce(self, acquisition: Acquisition, version: str) -> bool | None:
        """Announce a finished acquisition: whether it was (now, by this watcher); None
        while the live run started at its start still works on it."""
        event = acquisition.event(version)
        key = event["payload"]["key"]
        if not self.state.claim(acquisition, key, version, event["id"], event):
            return self.settle_live(key, event)
        if not self._post(key, event):
            return False
        scans = ",".join(map(str, acquisition.scans)) if acquisition.scans else "all scans"
        logger.info(
            "%s %s -> %s (event %s)",
            acquisition.raw_dataset_dir,
            scans,
            acquisition.technique,
            event["id"],
        )
        return True

    def announce_live(
        self, acquisition: Acquisition, source: str, scan_key: str, created: float | None = None
    ) -> bool:
        """Announce a scan that has just started (created at epoch ``created`` on the
        blissdata server ``source``, or seen being written: ``source="files"``) to the live
        run that follows it, under the key its completed event has: one announcement of the
        two, whichever comes first, and one among the watchers sharing this state. Whether
        it was announced now."""
        version = self.versions[acquisition.technique]
        event = acquisition.live_event(version, source, scan_key)
        key = event["payload"]["key"]
        if not self.state.claim(acquisition, key, version, event["id"], event):
            return False
        if not self._post(key, event):
            return False
        when = (
            "seen being written"
            if created is None
            else f"{time.time() - created:.2f} s after the scan was created"
        )
        logger.info(
            "%s scan %s started -> %s live (event %s, %s)",
            acquisition.raw_dataset_dir, ",".join(map(str, acquisition.scans or ())),
            acquisition.technique, event["id"], when,
        )  # fmt: skip
        return True

    def _stored_event(self, key: str) -> tuple[dict | None, float]:
        """The event of the announcement of ``key`` in this watcher's state, and when it
        was last posted (epoch s); None for one settled already (confirmed, failed)."""
        with connect(self.state.path) as db:
            row = db.execute(
                "SELECT event, posted, state FROM acquisitions WHERE key = ?", (key,)
            ).fetchone()
        if row is None or not row["event"] or row["state"] not in ("claimed", "emitted"):
            return None, 0.0
        return json.loads(row["event"]), float(row["posted"] or 0)

    def settle_live(self, key: str, event: dict) -> bool | None:
        """A finished scan whose key was announced already. When that announcement started
        a live run: confirmed if the live run processed the scan; None while it still works
        (or waits to start); and if it crashed, failed or never started, the scan is
        announced as finished now (``event``): that run takes the claim over, once. Whether
        ``event`` was posted."""
        stored, posted = self._stored_event(key)
        if not is_live(stored):
            return False  # announced as finished already: confirm() follows it
        deployment = event["resource"]["calypso.technique"]
        try:
            runs = flow_runs_with_key(self.api_url, deployments_for(deployment), key)
            claim = self._claim(key)
        except (OSError, ValueError, CalypsoError) as exc:
            logger.debug("cannot look for the live run of %s: %s", key, exc)
            return None
        found = verdict(claim, runs)
        raw = event["payload"]["raw"]
        if found == "done":
            self._confirmed(key, raw, claim, live=True)
            return False
        if found == "wait":
            return None
        grace = min(self.settings.watch.confirm_s, LIVE_START_GRACE_S)
        if found == "again" and not runs and time.time() - posted < grace:
            return None  # a short scan: its live run may not be created yet
        why = {"failed": "failed", "again": "crashed, was killed or never started"}[found]
        logger.warning(
            "%s: its live run %s: announced as finished (event %s)", raw, why, event["id"]
        )
        return self._post(key, event)

    def _confirmed(self, key: str, raw: str, claim: Claim | None, live: bool) -> None:
        """Mark ``key`` processed. A scan processed live is said so in the log, whichever
        check saw it first: the scan's end, or the periodic confirmation (which can come
        first when the scan's end is seen late, on a loaded machine)."""
        self.state.mark(key, "confirmed")
        if live:
            logger.info(
                "%s: processed live (flow run %s)", raw, claim.flow_run_id if claim else "?"
            )

    def _post(self, key: str, event: dict) -> bool:
        """Post a claimed announcement; its entry says emitted, or failed (posted again by
        the next :meth:`post_pending`)."""
        try:
            post_event(self.api_url, event)
        except (OSError, urllib.error.URLError) as exc:
            self.state.settle(key, emitted=False)
            logger.warning(
                "could not post the event for %s (%s): retried next poll",
                event["payload"]["raw"],
                exc,
            )
            return False
        self.state.settle(key, emitted=True, event=event)
        return True

    def post_pending(self, stale_after_s: float | None = None) -> int:
        """Post the announcements claimed but never posted: failed posts, and claims of a
        watcher killed before it posted (older than ``stale_after_s``; default: a few
        polls, so that a live watcher sharing the state posts its own). How many posted."""
        if stale_after_s is None:
            stale_after_s = max(60.0, 3 * self.settings.watch.interval_s)
        posted = 0
        for key, event in self.state.pending(stale_after_s):
            if self._post(key, event):
                posted += 1
                logger.info("%s: announced (it was claimed, not posted)", event["payload"]["raw"])
        return posted

    def _claim(self, key: str) -> Claim | None:
        """The catalogue's claim on ``key`` (None: no claim, or no catalogue here)."""
        from calypso.registry.catalogue import SQLiteCatalogue

        if not self.settings.catalogue_path.exists():
            return None
        return processing_claim(SQLiteCatalogue(self.settings.catalogue_path), key)

    def confirm(self) -> None:
        """Check that each announcement was processed (:func:`verdict`): done, still being
        processed (looked at again later), failed (said once), or to be announced again,
        because its run crashed, was killed, vanished, or never started (a server can lose
        an event under load): under a new event id, since Prefect drops ids it has seen,
        and safely, since the run claims the key in the catalogue."""
        watch = self.settings.watch
        for key, event, deployment, attempts in self.state.unconfirmed(watch.confirm_s):
            try:
                runs = flow_runs_with_key(self.api_url, deployments_for(deployment), key)
                claim = self._claim(key)
            except (OSError, ValueError, CalypsoError) as exc:
                logger.debug("cannot look for the runs of %s: %s", key, exc)
                return
            raw = event["payload"]["raw"]
            found = verdict(claim, runs)
            if found == "done":
                self._confirmed(key, raw, claim, live=is_live(event))
                continue
            if found == "wait" or is_live(event):
                continue  # a live run that did not process its scan: settle_live, at its end
            if found == "failed":
                self.state.mark(key, "processing-failed")
                logger.error(
                    "%s: its flow run failed (%s); look at the run's logs, then run it again",
                    raw,
                    claim.flow_run_id if claim else ", ".join(run for run, _ in runs),
                )
                continue
            if attempts >= watch.attempts:
                self.state.mark(key, "unconfirmed")
                logger.error(
                    "%s not processed after %d events: is `calypso serve` running and its %s "
                    "deployment's trigger enabled?",
                    raw,
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
            why = "no flow run yet" if not runs else f"its flow run {runs[0][0]} did not finish"
            logger.warning("%s: %s: event posted again", raw, why)

    def run(self, once: bool = False, stop: StopRequest | None = None) -> None:
        """Poll (and listen) until ``stop`` is asked (Ctrl-C, SIGTERM), or once. A stop is
        taken between two looks, never in the middle of one (a record half written)."""
        self._stop = stop
        self.post_pending(stale_after_s=0)  # what a watcher killed before posting left
        inotify = self.settings.watch.inotify and not once
        listening = listen(self.roots, self.look_soon) if inotify else None
        blissdata = self.settings.watch.blissdata_url
        following = None
        if blissdata is not None and not once:
            from calypso.flows.online.scan_starts import ScanStarts

            following = ScanStarts(self, blissdata).start()
        if not once:
            logger.info(
                "watching %s (polls every %g s%s%s)",
                ", ".join(map(str, self.roots)),
                self.settings.watch.interval_s,
                ", inotify" if listening is not None else "",
                ", live runs from growing files" if self.settings.watch.live_from_files else "",
            )
        try:
            while True:
                began = time.monotonic()
                announced = self.poll()
                self.post_pending()
                self.confirm()
                if once:  # said even when nothing is new: a silent exit looks like a fault
                    logger.info(
                        "looked once at %s: %d acquisition(s) announced",
                        ", ".join(map(str, self.roots)),
                        len(announced),
                    )
                    return
                self._until_next_poll(began)
        finally:
            for stop in (listening, following):
                if stop is not None:
                    stop.set()

    def _stop_if_asked(self) -> None:
        if self._stop is not None:
            self._stop.check()

    def _until_next_poll(self, began: float) -> None:
        """Wait for the next poll, looking meanwhile at the dataset files handed to
        :meth:`look_soon` as they come."""
        while (left := self.settings.watch.interval_s - (time.monotonic() - began)) > 0:
            self._stop_if_asked()
            try:  # a stop asked meanwhile is seen within STOP_SEEN_S
                files = {self._soon.get(timeout=min(left, STOP_SEEN_S))}
            except queue.Empty:
                continue
            while not self._soon.empty():
                files.add(self._soon.get())
            for bliss_file in sorted(files):
                self.look_at(bliss_file)
            self.post_pending()
