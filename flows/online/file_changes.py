"""Which dataset files ``calypso watch`` looks at before its next poll, on its own
machine: those inotify sees change.

A dataset file written here is seen at once (through ``watchfiles``); NFS and GPFS do
not tell inotify of other clients' writes, so the polls go on, and the files of scans
that blissdata says ended are looked at too (:mod:`calypso.flows.online.scan_starts`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("calypso.watch")


def is_dataset_file(change: object, path: str) -> bool:
    """A Bliss dataset file (``RAW_DATA/<collection>/<dataset>/<dataset>.h5``, as the polls
    find them): Bliss writes ``end_time`` there last. The Lima files beside it change with
    every frame, and results written under PROCESSED_DATA, and wake nobody."""
    dataset = Path(path)
    return (
        dataset.suffix == ".h5"
        and dataset.stem == dataset.parent.name
        and dataset.parent.parent.parent.name == "RAW_DATA"
    )


def listen(roots: list[Path], look: Callable[[Path], None]) -> threading.Event | None:
    """Have ``look`` each dataset file that changes under ``roots`` as soon as it changes
    (inotify, through ``watchfiles``), so a finished scan is announced within a second
    instead of at the next poll. Only this machine's writes are seen (NFS and GPFS do not
    tell inotify of other clients'): the polls go on. Returns the event that stops
    listening."""
    try:
        from watchfiles import watch
    except ImportError:  # polling alone
        return None
    stop = threading.Event()

    def follow() -> None:
        try:
            for changes in watch(
                *roots,
                watch_filter=is_dataset_file,
                stop_event=stop,
                debounce=200,  # ms: one look for the burst of writes that ends a scan
                step=20,
                raise_interrupt=False,
            ):
                for path in sorted({path for _, path in changes}):
                    look(Path(path))
        except Exception as exc:  # e.g. inotify's watch limit on a huge tree: poll only
            logger.warning("not listening for changes (%s): polling only", exc)

    threading.Thread(target=follow, name="watch-inotify", daemon=True).start()
    return stop
