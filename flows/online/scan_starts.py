"""``calypso watch --blissdata URL``: a live run started at each scan's start (docs/live.md,
"Started by the service").

A thread of the watcher follows the scans Bliss creates on its data-stream server
(blissdata's ``DataStore.get_next_scan``). A scan whose dataset file lies under the
watched roots, and whose beamline rule (the rules of finished scans: technique, detector
and title patterns) gives it to a technique fed live with ``unit = "scan"``, is announced
at once (``calypso.acquisition.started``); ``calypso serve``'s ``<technique>-live``
deployment starts a run that follows that scan. The announcement is the watcher's outbox
entry under the processing key the scan's completed event has (:meth:`Watcher.announce_live
<calypso.flows.online.watch.Watcher.announce_live>`), so the end of the scan finds it
announced already (:meth:`Watcher.settle_live <calypso.flows.online.watch.Watcher.
settle_live>`), and the live run claims that same key in the catalogue.

Only blissdata is followed for starts: a dataset file seen by the polls or inotify starts
its run at the scan's end, as before.

It also tells the watcher when each scan under the roots ends, so that the scan's dataset
file is looked at then, not at the next poll: the end of a scan reduced at its end (a
saved flow's rule, a live run that crashed) is announced within a second on NFS and GPFS
too, where inotify sees nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from calypso.errors import CalypsoError
from calypso.flows.online.acquisitions import started_acquisition

if TYPE_CHECKING:
    from calypso.flows.online.watch import Watcher

logger = logging.getLogger("calypso.watch")

PREPARE_S = 10.0  # how long a new scan may take to say its streams (detectors)
RETRY_S = 5.0  # between two attempts to reach a blissdata server that does not answer
# When the dataset file is looked at after a scan's end (s): Bliss's writer may write
# its end_time a moment after the scan ended on the server. Later, the polls.
END_LOOKS_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def public_url(url: str) -> str:
    """``url`` without its user and password: what events and logs may carry."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def created_at(timetag: str) -> float:
    """The epoch time of a blissdata timetag (``<ms>-<seq>``, a Redis stream id)."""
    return int(timetag.split("-")[0]) / 1000


class ScanStarts:
    """Follows the scans created on one blissdata server for a watcher, in a thread."""

    def __init__(self, watcher: Watcher, url: str) -> None:
        self.watcher = watcher
        self.url = url
        self.source = public_url(url)
        self._stop = threading.Event()  # ends following, scan ends included

    def start(self) -> threading.Event:
        """Follow in the background; returns the event that stops following."""
        stop = self._stop
        threading.Thread(
            target=self._follow, args=(stop,), name="watch-blissdata", daemon=True
        ).start()
        return stop

    def _follow(self, stop: threading.Event) -> None:
        from blissdata.exceptions import NoScanAvailable

        from calypso.tasks.raw.live_streams import _connect

        since: str | None = None
        said = ""
        while not stop.is_set():
            store = None
            try:
                store = _connect(self.url)
                if since is None:
                    since = self._catch_up(store)
                logger.info("following scan starts on %s", self.source)
                said = ""
                while not stop.is_set():
                    try:
                        # Short waits: a long blocking read outlasts the socket's time-out.
                        since, key = store.get_next_scan(since=since, timeout=1.0)
                    except NoScanAvailable:
                        continue
                    self.look_at(store, key, created_at(since))
            except Exception as exc:  # the server went away: wait, connect again
                if str(exc) != said:  # said once, not every attempt
                    logger.warning(
                        "cannot follow scan starts on %s (%s); trying again every %g s",
                        self.source, exc, RETRY_S,
                    )  # fmt: skip
                said = str(exc)
                stop.wait(RETRY_S)
            finally:
                if store is not None:
                    store._redis.connection_pool.disconnect()

    def _catch_up(self, store: Any) -> str:
        """Where to follow from: after the last scan created, that scan announced first if
        it still runs (a watcher started, or restarted, mid-scan)."""
        from blissdata.exceptions import NoScanAvailable

        since = store.get_last_scan_timetag()
        if since != "0-0":
            try:
                timetag, key = store.get_last_scan()
            except NoScanAvailable:  # deleted meanwhile
                return since
            self.look_at(store, key, created_at(timetag))
        return since

    def look_at(self, store: Any, key: str, created: float) -> bool:
        """Announce the live run of the scan ``key`` if a rule gives it to a technique fed
        live; whether it was announced (by this watcher, now)."""
        from blissdata.exceptions import ScanLoadError, ScanNotFoundError
        from blissdata.redis_engine.scan import ScanState

        from calypso.tasks.raw.live_streams import load_scan

        try:
            scan = load_scan(store, key)
            deadline = time.monotonic() + PREPARE_S
            while scan.state < ScanState.PREPARED and time.monotonic() < deadline:
                scan.update(block=True, timeout=0.2)  # its streams come with PREPARED
        except (ScanLoadError, ScanNotFoundError) as exc:
            logger.debug("scan %s: %s", key, exc)
            return False
        if scan.state < ScanState.PREPARED:
            logger.info("scan %s not prepared within %g s: left to its end", key, PREPARE_S)
            return False
        if scan.state >= ScanState.STOPPED:
            return False  # over already: announced at its end, as any scan
        streams = scan.streams
        detectors = tuple(n.split(":")[0] for n, s in streams.items() if s.plugin == "lima")
        info = scan.info
        filename = info.get("filename")
        try:
            acquisition = started_acquisition(
                filename, scan.number, str(info.get("title") or scan.name),
                detectors, self.watcher.roots, self.watcher.settings.watch,
            )  # fmt: skip
        except CalypsoError as exc:  # outside the roots or the data policy: not ours
            logger.info("scan %s (%s) left alone: %s", key, filename, exc)
            return False
        if filename:
            threading.Thread(
                target=self._tell_end, args=(scan, Path(os.path.realpath(filename))),
                name="watch-scan-end", daemon=True,
            ).start()  # fmt: skip
        if acquisition is None:
            return False
        return self.watcher.announce_live(acquisition, self.source, key, created)

    def _tell_end(self, scan: Any, bliss_file: Path) -> None:
        """Once ``scan`` has ended on the server, have the watcher look at its dataset
        file (at each of :data:`END_LOOKS_S`)."""
        from blissdata.redis_engine.scan import ScanState

        stop = self._stop
        try:
            while scan.state < ScanState.STOPPED and not stop.is_set():
                scan.update(block=True, timeout=1.0)
        except Exception as exc:  # the server went away: the polls see the end
            logger.debug("scan %s: not followed to its end (%s)", scan.key, exc)
            return
        ended = time.monotonic()
        for delay in END_LOOKS_S:
            if stop.wait(max(0.0, ended + delay - time.monotonic())):
                return
            self.watcher.look_soon(bliss_file)
