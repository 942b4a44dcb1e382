"""The one fork server of a process: new Python processes forked from a process that
imported their code once (multiprocessing's ``forkserver`` start method).

A process started afresh (``spawn``) imports everything it runs: for a Dask worker of a
diffraction run, Prefect, Dask, pyFAI, scipy and h5py, ~2.5 s of CPU each. Forked from a
fork server, each starts with all of it imported; the fork server itself is a clean,
single-threaded process started once, so forking it is safe where forking the caller (with
its threads) is not. Used by a cold ``calypso run``'s and a kept cluster's local workers
(:func:`calypso.executors.dask.start_local_cluster`) and by ``calypso serve``'s flow runs
(:mod:`calypso.flows.online.warm_starts`).

A process has one fork server, and every process forked from it has the modules and the
environment it started with. It is therefore given to the first user that asks, and to a
later one only if that one asks for the same modules in the same environment; any other
starts its processes afresh, as without it (tests and notebooks that run one flow after
another with other settings, say).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Mapping

_started_for: str | None = None  # what this process's fork server imports, and where
# Set in this process by Dask's nanny itself as it starts workers, the same for all of them.
_DASK_OWN = ("PYTHONHASHSEED", "__DASK_PARENT_PID")


def fork_server_for(
    modules: Iterable[str], environment: Mapping[str, object] | None = None
) -> bool:
    """Whether new processes that import ``modules``, in this process's environment plus
    ``environment``, can be forked from this process's fork server: True for the first
    caller (the fork server will import ``modules`` as it starts) and for the same again."""
    global _started_for
    modules = list(modules)
    identity = json.dumps(
        {
            "modules": modules,
            "environment": {
                **{k: v for k, v in os.environ.items() if k not in _DASK_OWN},
                **{k: str(v) for k, v in (environment or {}).items()},
            },
            "path": sys.path,
            "folder": os.getcwd(),
        },
        sort_keys=True,
    )
    if _started_for is None:
        multiprocessing.get_context("forkserver").set_forkserver_preload(modules)
        _started_for = identity
    return identity == _started_for
