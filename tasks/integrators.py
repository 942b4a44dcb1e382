"""The pyFAI integrators a worker process keeps between tasks.

Prefect hands Dask its task functions by value (cloudpickle), so a cache held
in the task module's globals would arrive empty with every task. Tasks reach
this module through its name instead, which Dask resolves to the worker's own,
long-lived copy: the sparse matrix of a geometry is then built once per worker.
"""

from calypso.techniques.diffraction import IntegratorCache

WORKER_INTEGRATORS = IntegratorCache()
