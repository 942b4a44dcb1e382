"""Calypso: workflow orchestration for synchrotron data reduction.

The package is laid out in rooms (see README): ``techniques`` (the science,
pure functions on arrays), ``tasks`` (Prefect tasks that move data),
``flows`` (one flow per technique and the CLI), ``executors`` (Dask clusters
and task runners) and ``registry`` (catalogues).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``calypso.run`` and ``calypso.load`` for notebooks, imported on first use so that
    # ``import calypso`` (and every worker process) stays light.
    if name in ("run", "load"):
        from calypso.flows import notebooks

        return getattr(notebooks, name)
    raise AttributeError(f"module 'calypso' has no attribute {name!r}")
