"""Where chunk results are kept between attempts of a flow run (:mod:`.caching`), and
their expiry. Kept results are pickles, which run code when read, and name the
proposal's files: the folder is the service's own (0700, files 0600) and results older
than ``serve.result_max_age_h`` are removed (:func:`prune_results`, when a run or
``calypso serve`` starts, and now and then as results are written).

Nothing here imports Prefect: the CLI prunes before Prefect is set up.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from calypso.errors import ConfigurationError

FOLDER_MODE, FILE_MODE = 0o700, 0o600
_PRUNE_EVERY_S = 3600.0  # at most once an hour a process, as it writes results
_last_pruned = 0.0
_prune_lock = threading.Lock()


def storage() -> tuple[Path, float]:
    """Where results are kept and for how long (s), as the settings say now.
    ``PREFECT_LOCAL_STORAGE_PATH``, which the CLI sets from the settings for its workers,
    wins: a worker process reads the folder its flow run's process chose."""
    from calypso.settings import load_settings

    settings = load_settings()
    named = os.environ.get("PREFECT_LOCAL_STORAGE_PATH")
    folder = Path(named) if named else settings.result_storage
    return folder.expanduser().absolute(), settings.serve.result_max_age_h * 3600


def private_folder(folder: Path) -> Path:
    """``folder`` (and missing parents) made; ``folder`` itself the owner's only."""
    folder.mkdir(FOLDER_MODE, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o7777 != FOLDER_MODE:
        os.chmod(folder, FOLDER_MODE)
    return folder


def prune_results(folder: Path | None = None, max_age_s: float | None = None) -> int:
    """Remove kept results older than the maximum age, and the folders they leave empty;
    make the storage private. Returns how many files went."""
    configured_folder, configured_age = storage()
    folder = folder or configured_folder
    max_age_s = configured_age if max_age_s is None else max_age_s
    if not folder.is_dir():
        return 0
    try:
        private_folder(folder)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot make the result storage {folder} private (0700): {exc.strerror}; set "
            "CALYPSO_SERVE__RESULT_STORAGE to a folder of this account's"
        ) from None
    limit = time.time() - max_age_s
    removed = 0
    for parent, folders, names in os.walk(folder, topdown=False):
        for name in names:
            path = Path(parent) / name
            try:
                if path.lstat().st_mtime < limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # another process pruned it first
                continue
        for name in folders:
            try:
                (Path(parent) / name).rmdir()
            except OSError:  # not empty: results still fresh
                continue
    return removed


def prune_now_and_then(folder: Path) -> None:
    """A long-running service prunes as it writes, not only when it starts."""
    global _last_pruned
    now = time.monotonic()
    with _prune_lock:
        if _last_pruned and now - _last_pruned < _PRUNE_EVERY_S:
            return
        _last_pruned = now
    prune_results(folder)
