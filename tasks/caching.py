"""Which task results are kept, so a retried flow run recomputes only unfinished chunks.

A chunk task's result (the path of the part file it wrote and a few numbers) is
cached under a key made of its inputs (the chunk, the parameters, the part
folder, which is named after the flow run) and its source code, and persisted
to Calypso's result storage (``CALYPSO_SERVE__RESULT_STORAGE``, default
``<home>/results``; ``PREFECT_LOCAL_STORAGE_PATH`` when set, as the CLI sets it from
that setting for the workers). A retry of the same flow run finds the chunks that
finished; a new run, other parameters or changed code compute again.

Kept results are pickles, which run code when read, and name the proposal's files: the
storage is the service's own (:class:`PrivateResults`: folders 0700, files 0600, whatever
the umask) and results expire after ``serve.result_max_age_h`` (not reused when older;
removed by :func:`calypso.tasks.result_storage.prune_results` when a run or
``calypso serve`` starts, and now and then as results are written).
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import LocalFileSystem
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from calypso.tasks.result_storage import FILE_MODE, private_folder, prune_now_and_then, storage


class PrivateResults(LocalFileSystem):
    """Prefect's local result storage, private and expiring: its folders 0700, its files
    0600 (written under a temporary name, then renamed), a file older than the maximum
    age read as missing, so the chunk is computed again."""

    _block_type_name = "Calypso private results"

    # Prefect calls the sync methods with ``_sync=True`` (they are async_dispatch'ed in
    # its own blocks), the async ones in async contexts.

    def _resolve_path(self, path: str | None) -> Path:
        base = Path(self.basepath) if self.basepath else storage()[0]
        base = base.expanduser().resolve()
        if path is None:
            return base
        resolved = Path(path).expanduser()
        resolved = (resolved if resolved.is_absolute() else base / resolved).resolve()
        if resolved != base and base not in resolved.parents:
            raise ValueError(f"{resolved} is outside the result storage {base}")
        return resolved

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # type: ignore[override]
        resolved = self._resolve_path(path)
        max_age = storage()[1]
        if time.time() - resolved.stat().st_mtime > max_age:
            raise FileNotFoundError(f"{resolved} expired (older than {max_age / 3600:g} h)")
        return resolved.read_bytes()

    async def aread_path(self, path: str) -> bytes:
        return await run_sync_in_worker_thread(self.read_path, path)

    def write_path(  # type: ignore[override]
        self, path: str, content: bytes, _sync: bool | None = None
    ) -> str:
        resolved = self._resolve_path(path)
        base = self._resolve_path(None)
        private_folder(base)
        for folder in reversed([p for p in resolved.parents if base in p.parents]):
            private_folder(folder)
        if resolved.exists() and not resolved.is_file():
            raise ValueError(f"{resolved} already exists and is not a file")
        temporary = resolved.with_name(f".{resolved.name}.{uuid.uuid4().hex[:8]}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.fchmod(descriptor, FILE_MODE)  # what the umask took off, the mode says
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(content)
            os.replace(temporary, resolved)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        prune_now_and_then(base)
        return str(resolved)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await run_sync_in_worker_thread(self.write_path, path, content)


RESULTS_BLOCK = "calypso"  # the PrivateResults block's name in the Prefect API
_saved = False
_loaded: dict[str | None, Any] = {}  # the block, by Prefect API (results_block)


def save_result_block() -> None:
    """Save the result storage block in the Prefect API, once a process, before the first
    chunk task runs: Prefect takes only a saved storage block for a task's results (the
    workers read it by name), and the block's folder and age come from the settings where
    it is used, so the one saved block serves every run."""
    global _saved
    if _saved:
        return
    try:
        results_block()  # kept: what the chunk tasks' result storage resolves to
    except Exception:  # not saved yet (or by an older Calypso): save it now
        # Two runs starting at once may both save it: the first one's does.
        with suppress(ObjectAlreadyExists):
            PrivateResults().save(RESULTS_BLOCK, overwrite=True)
    _saved = True


CHUNK_TASK: dict[str, Any] = {
    "cache_policy": INPUTS + TASK_SOURCE,
    "persist_result": True,
    "result_storage": f"{PrivateResults.get_block_type_slug()}/{RESULTS_BLOCK}",
}


def results_block() -> PrivateResults:
    """The saved block, read from this process's Prefect API once (a block's id is its
    server's: one for each API)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if api not in _loaded:
        # Loaded by its own class: Prefect's ``Block.load("slug/name")`` finds the class by
        # its slug, after importing every installed Prefect collection (prefect_dask, and
        # Dask's distributed with it: ~0.3 s of a run in the command's threads).
        _loaded[api] = PrivateResults.load(RESULTS_BLOCK, _sync=True)
    return _loaded[api]


def _load_the_block_once() -> None:
    """Prefect loads a task's result storage block from its API for every task run (a
    round trip, 0.1-0.2 s of each chunk task measured here). The block saved by
    :func:`save_result_block` holds nothing of its own (its folder and age are read from
    the settings where it is used), so each process loads it once and keeps it. Other
    storages are resolved by Prefect as before."""
    from prefect import results

    resolve = getattr(results, "resolve_result_storage", None)
    if resolve is None or getattr(resolve, "loads_calypso_block_once", False):
        return
    ours = CHUNK_TASK["result_storage"]

    def resolve_result_storage(result_storage: Any, *args: Any, **kwargs: Any) -> Any:
        if result_storage != ours:
            return resolve(result_storage, *args, **kwargs)
        return results_block()

    resolve_result_storage.loads_calypso_block_once = True  # type: ignore[attr-defined]
    results.resolve_result_storage = resolve_result_storage


_load_the_block_once()  # in every process that runs or submits chunk tasks
