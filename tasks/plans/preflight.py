"""Checks every technique makes before a run starts Prefect or Dask."""

from __future__ import annotations

from calypso.errors import ParameterError, RawDataError
from calypso.registry import open_catalogue
from calypso.settings import CalypsoSettings
from calypso.tasks.raw.data_policy import RawDataset


def require_registrable(
    input_path: str, raw: RawDataset | None, raw_file: str | None, settings: CalypsoSettings
) -> None:
    """Refuse, before any work, a run whose result the configured catalogue could not take.

    ICAT registers processed datasets of raw datasets of the data policy that
    have a sample name, in a proposal with an investigation on that beamline.
    """
    if settings.catalogue.backend != "icat":
        return
    if raw is None:
        raise ParameterError(
            f"{input_path}: the catalogue is ICAT, which registers raw datasets of the data "
            "policy only; reduce a dataset under RAW_DATA or use the sqlite catalogue"
        )
    if not raw.sample_name:
        raise RawDataError(
            f"{raw_file or input_path}: no sample name (N.1/sample/name), which ICAT requires; "
            "fix the Bliss file or register with the sqlite catalogue"
        )
    from calypso.registry.icat import IcatCatalogue

    catalogue = open_catalogue(settings)
    if isinstance(catalogue, IcatCatalogue):
        catalogue.require_investigation(raw.beamline, raw.proposal)
