"""Task that registers a processed dataset in the configured catalogue, and its record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from calypso.registry import ProcessedDataset, open_catalogue
from calypso.settings import load_settings
from calypso.tasks.raw.data_policy import RawDataset
from calypso.tasks.writers.nexus import now_iso, software_versions


class Registration(BaseModel):
    catalogue_id: int
    warning: str | None = None


@task(name="register_processed_dataset", cache_policy=NO_CACHE)
def register_processed_dataset(record: ProcessedDataset) -> Registration:
    """Record the processed dataset in the catalogue(s); a delivery problem is a warning.

    The settings are read here, not passed: they hold the catalogue's credentials, which
    must never become a task's recorded parameters."""
    catalogue = open_catalogue(load_settings())
    catalogue_id = catalogue.register(record)
    warning = catalogue.last_warning
    if warning:
        get_run_logger().warning(warning)
    return Registration(catalogue_id=catalogue_id, warning=warning)


def processed_record(
    technique: str,
    plan: Any,
    count: int,
    *,
    run_id: str,
    started: str,
    clock: float,
    outputs: list[str],
    status: Any = "completed",
    message: str | None = None,
) -> ProcessedDataset:
    """The catalogue record of a run of ``plan`` (any technique's plan: ``input``, ``raw``,
    ``output_dir``, ``parameters``); ``clock`` is the run's ``time.perf_counter()`` start."""
    raw: RawDataset | None = plan.raw
    return ProcessedDataset(
        technique=technique,
        raw_dataset=str(raw.raw_dataset_dir) if raw else str(Path(plan.input).absolute()),
        processed_path=plan.output_dir,
        outputs=outputs,
        proposal=raw.proposal if raw else None,
        beamline=raw.beamline if raw else None,
        sample_name=raw.sample_name if raw else None,
        flow_run_id=run_id,
        parameters=plan.parameters.model_dump(mode="json"),
        software=software_versions(),
        status=status,
        message=message,
        started=started,
        finished=now_iso(),
        duration_s=round(time.perf_counter() - clock, 3),
        frames=count,
    )
