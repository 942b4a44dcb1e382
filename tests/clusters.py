"""Dask clusters shared by the test session: one of one worker, one of two, started when
first asked for, every technique's code preloaded, closed when the session ends.

A run that boots a local cluster of its own spends 7-10 s of this machine's two cores
starting and closing workers (each imports pyFAI, silx, numba ...) for seconds of work;
runs on a cluster that is already up do the same work on the same kind of workers.
Tests that are about starting clusters (``calypso run`` as a command, the SLURM and
closed-services tests) still start their own.
"""

from __future__ import annotations

from typing import Any

_clusters: dict[int, Any] = {}


def shared_cluster(workers: int) -> str:
    """The address of the session's cluster of ``workers`` workers (1 or 2)."""
    if workers not in (1, 2):
        raise ValueError(f"the session shares clusters of 1 or 2 workers, not {workers}")
    if workers not in _clusters:
        from calypso.executors.dask import local_cluster_options, start_local_cluster
        from calypso.flows.techniques import TECHNIQUES
        from calypso.settings import load_settings

        preload = [technique.preload for technique in TECHNIQUES.values()]
        executor = load_settings(executor={"n_workers": workers, "preload": preload}).executor
        _clusters[workers] = start_local_cluster(**local_cluster_options(executor))
    return _clusters[workers].scheduler_address


def on_cluster(workers: int) -> dict[str, Any]:
    """Executor settings for a run on the session's cluster of ``workers`` workers."""
    # n_workers as well: plans size their chunks by the workers they will have
    return {"kind": "address", "address": shared_cluster(workers), "n_workers": workers}


def run_flow(technique: str, input_path: Any, parameters: Any, workers: int = 2, output=None):
    """``technique`` run in this process on the session's cluster of ``workers`` workers."""
    from calypso.flows.api import run_technique
    from calypso.settings import load_settings

    settings = load_settings(executor=on_cluster(workers))
    return run_technique(technique, str(input_path), parameters, None, output, settings)


def close_clusters() -> None:
    for cluster in _clusters.values():
        cluster.close()
    _clusters.clear()
