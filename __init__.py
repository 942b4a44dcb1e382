"""Calypso: workflow orchestration for synchrotron data reduction.

The package is laid out in rooms (see README): ``techniques`` (the science,
pure functions on arrays), ``tasks`` (Prefect tasks that move data),
``flows`` (one flow per technique and the CLI), ``executors`` (Dask clusters
and task runners) and ``registry`` (catalogues).
"""

__version__ = "0.1.0"
