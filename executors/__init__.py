"""Everything that builds Dask clusters and Prefect task runners.

Loaded lazily: importing :mod:`calypso.executors.kept` (a command that only looks for the
kept local server) or running a few spectra in the command's own threads must not pay
for importing Dask's ``distributed`` (~0.3 s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calypso.executors.dask import boot_local_cluster, build_task_runner, local_worker_count

__all__ = ["boot_local_cluster", "build_task_runner", "local_worker_count"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from calypso.executors import dask

        return getattr(dask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
