"""Everything that builds Dask clusters and Prefect task runners."""

from calypso.executors.dask import boot_local_cluster, build_task_runner, local_worker_count

__all__ = ["boot_local_cluster", "build_task_runner", "local_worker_count"]
