"""What wakes ``calypso watch`` before its next poll on its own machine: inotify.

A dataset file written here is seen at once (through ``watchfiles``); NFS and GPFS do
not tell inotify of other clients' writes, so the polls go on, and scan ends that
blissdata tells wake the watcher too (:mod:`calypso.flows.online.scan_starts`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger("calypso.watch")


def is_dataset_file(change: object, path: str) -> bool:
    """A Bliss dataset file (``<dataset>/<dataset>.h5``): Bliss writes ``end_time`` there
    last. The Lima files beside it change with every frame and wake nobody."""
    name = os.path.basename(path)
    return name.endswith(".h5") and name[:-3] == os.path.basename(os.path.dirname(path))


def listen(roots: list[Path], wake: threading.Event) -> threading.Event | None:
    """Set ``wake`` as soon as a dataset file changes under ``roots`` (inotify, through
    ``watchfiles``), so a finished scan is announced within a second instead of at the
    next poll. Only this machine's writes are seen (NFS and GPFS do not tell inotify of
    other clients'): the polls go on. Returns the event that stops listening."""
    try:
        from watchfiles import watch
    except ImportError:  # polling alone
        return None
    stop = threading.Event()

    def follow() -> None:
        try:
            for _ in watch(
                *roots,
                watch_filter=is_dataset_file,
                stop_event=stop,
                debounce=200,  # ms: one wake for the burst of writes that ends a scan
                step=20,
                raise_interrupt=False,
            ):
                wake.set()
        except Exception as exc:  # e.g. inotify's watch limit on a huge tree: poll only
            logger.warning("not listening for changes (%s): polling only", exc)

    threading.Thread(target=follow, name="watch-inotify", daemon=True).start()
    return stop
