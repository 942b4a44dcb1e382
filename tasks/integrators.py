"""What a worker process keeps between tasks: pyFAI integrators and detector images.

Prefect hands Dask its task functions by value (cloudpickle), so a cache held
in the task module's globals would arrive empty with every task. Tasks reach
this module through its name instead, which Dask resolves to the worker's own,
long-lived copy: the sparse matrix of a geometry is then built once per worker,
and a mask, dark or flat is read once per worker instead of once per chunk.
"""

import os
from functools import lru_cache

import numpy as np

from calypso.tasks.raw.frames import read_image
from calypso.techniques.integrator_cache import IntegratorCache

WORKER_INTEGRATORS = IntegratorCache()


def detector_image(location: str, what: str) -> np.ndarray:
    """A mask, dark or flat, read once per worker while its file is unchanged."""
    file_name = location.split("::", 1)[0]
    return _detector_image(location, what, os.stat(file_name).st_mtime_ns)


@lru_cache(maxsize=8)
def _detector_image(location: str, what: str, mtime_ns: int) -> np.ndarray:
    # Shared by every chunk of this worker; it stays writable only because
    # pyFAI's Cython kernels ask for writable buffers (they do not write).
    return read_image(location, what)
