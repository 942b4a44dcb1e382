"""Task that registers a processed dataset in the configured catalogue."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.registry import ProcessedDataset, open_catalogue
from calypso.settings import load_settings


class Registration(BaseModel):
    catalogue_id: int
    warning: str | None = None


@task(name="register_processed_dataset", cache_policy=NO_CACHE)
def register_processed_dataset(record: ProcessedDataset) -> Registration:
    """Record the processed dataset in the catalogue(s); a delivery problem is a warning."""
    catalogue = open_catalogue(load_settings())
    catalogue_id = catalogue.register(record)
    warning = catalogue.last_warning
    if warning:
        get_run_logger().warning(warning)
    return Registration(catalogue_id=catalogue_id, warning=warning)
