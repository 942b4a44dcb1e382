"""Everything that builds Dask clusters and Prefect task runners."""

from calypso.executors.dask import build_task_runner, local_worker_count

__all__ = ["build_task_runner", "local_worker_count"]
