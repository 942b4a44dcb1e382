"""Calypso: workflow orchestration for synchrotron data reduction.

The package is laid out in rooms (see README): ``techniques`` (the science,
pure functions on arrays), ``tasks`` (Prefect tasks that move data),
``flows`` (one flow per technique and the CLI), ``executors`` (Dask clusters
and task runners) and ``registry`` (catalogues).
"""

import os

__version__ = "0.1.0"

# A dataset's external raw files (a Lima EDF saving that the Bliss dataset file refers
# to) are named relative to the HDF5 file naming them, not to wherever the reader runs
# (HDF5's default: a relative name was looked for in the working folder). HDF5 reads
# this as it starts, before h5py's first import; worker processes inherit it.
os.environ.setdefault("HDF5_EXTFILE_PREFIX", "${ORIGIN}")


def __getattr__(name: str):
    # ``calypso.run`` and ``calypso.load`` for notebooks, imported on first use so that
    # ``import calypso`` (and every worker process) stays light.
    if name in ("run", "load"):
        from calypso.flows import notebooks

        return getattr(notebooks, name)
    raise AttributeError(f"module 'calypso' has no attribute {name!r}")
