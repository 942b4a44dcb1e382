"""``calypso.run`` and ``calypso.load``: Calypso from a notebook or a plain script.

>>> import calypso
>>> result = calypso.run("spectroscopy", "fe_foil.xdi", output="out")
>>> result.data.axes, result.data.signal       # arrays, read from the NeXus file when used
>>> calypso.load(result.record.id)             # the same result later, by catalogue id

These go through :func:`calypso.flows.api.run_technique`, as ``calypso run`` does: sent
to ``calypso serve`` when one is running (its warm workers), else one temporary Prefect
server (or the configured one); the progress bar, the catalogue.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.flows.api import load_settings_with_workers, parameters_from, run_technique
from calypso.settings import CalypsoSettings

if TYPE_CHECKING:
    from calypso.tasks.results import Result

__all__ = ["load", "run"]

SOURCE = " given to calypso.run()"  # where the parameters came from, in error messages


def run(
    technique: str,
    raw: str | Path,
    *,
    output: str | Path | None = None,
    scans: list[int] | None = None,
    workers: int | None = None,
    export_to: str | None = None,
    **parameters: Any,
) -> Result:
    """Reduce ``raw`` with ``technique`` (``calypso.run``) and return the :class:`Result`.

    Parameters are the technique's (``calypso parameters TECHNIQUE``) as keyword arguments;
    the run is the one ``calypso run`` does: checked first, a progress bar, the result in
    the catalogue. No ``if __name__ == "__main__"`` guard is needed in a script.

    >>> result = calypso.run("diffraction", raw, poni="ceo2.poni", npt=2000, output="out")
    >>> result.data.signal.shape   # (frames, npt)
    """
    from calypso.tasks.results import from_record

    settings = load_settings_with_workers(workers)
    # Paths are welcome as Path objects; the parameter models hold them as text.
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in parameters.items()}
    where = str(output) if output is not None else None
    summary = None
    if not workers:
        from calypso.flows.online.submissions import run_by_service, service_socket

        summary = run_by_service(
            service_socket(settings),
            technique,
            str(raw),
            lambda: values,
            scans,
            where,
            export_to,
            SOURCE,
        )
    if summary is None:
        from calypso.flows.runtime import prepare_environment

        prepare_environment(settings)  # before the technique's modules import silx and pyFAI
        model = parameters_from(technique, values, SOURCE)
        with _script_not_rerun(), _prefect_logs_kept_to_prefect():
            summary = run_technique(
                technique, str(raw), model, scans, where, settings, export_to=export_to
            )
    record = _open_catalogue(settings).get(summary["catalogue_id"])
    return from_record(record, summary)


def load(source: str | int | Path) -> Result:
    """A processed result (``calypso.load``): a catalogue id, a processed folder or a NeXus
    file, its arrays read only when used.

    >>> result = calypso.load("out/CeO2_0001.h5")
    >>> q, intensity = result.data.axes["q"], result.data.signal
    """
    from calypso.settings import load_settings
    from calypso.tasks.results import load_result

    return load_result(source, _open_catalogue(load_settings()))


def _open_catalogue(settings: CalypsoSettings) -> Any:
    from calypso.registry.catalogue import open_catalogue

    return open_catalogue(settings)


@contextmanager
def _prefect_logs_kept_to_prefect() -> Iterator[None]:
    """Prefect's INFO lines go to its API (the UI), not into the notebook: some libraries
    (pyFAI) give the root logger a handler at import, and Prefect's loggers propagate."""
    logger = logging.getLogger("prefect")
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = propagate


@contextmanager
def _script_not_rerun() -> Iterator[None]:
    """Let a plain script start Dask's worker processes without a ``__main__`` guard.

    Python starts them with "spawn", which re-imports the script that started them (and so
    would start the run again, in every worker, without end) unless ``__main__`` hides where
    it came from. Workers need only Calypso's modules, so for the run's lifetime (a worker
    restarted after a crash is spawned the same way) ``__main__`` forgets its file and its
    module name. A notebook's ``__main__`` has neither: nothing changes there.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    if main is None or (saved.get("__file__") is None and saved.get("__spec__") is None):
        yield
        return
    main.__spec__ = None
    if "__file__" in saved:
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
