"""Task that registers a processed dataset in the configured catalogue."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from calypso.registry import ProcessedDataset, open_catalogue
from calypso.settings import load_settings


@task(name="register_processed_dataset", cache_policy=NO_CACHE)
def register_processed_dataset(record: ProcessedDataset) -> int:
    """Record the processed dataset in the catalogue; returns its catalogue id."""
    return open_catalogue(load_settings()).register(record)
