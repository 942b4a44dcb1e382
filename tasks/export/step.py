"""The export as a Prefect task: the optional last step of any flow run (``export_to``).

Kept apart from the rest of :mod:`calypso.tasks.export` so that ``calypso export`` does not
import Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from calypso.settings import load_settings
from calypso.tasks.export.records import export_summary, record_export
from calypso.tasks.export.transfer import export_dataset
from calypso.tasks.progress import RunProgress


@task(name="export_processed_dataset", cache_policy=NO_CACHE)
def export_processed_dataset(
    source: str,
    uri: str,
    record_id: int | None = None,
    include: list[str] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Send a processed dataset to object storage (a progress artifact shows the bytes
    sent), record the export in the catalogue and tell ICAT."""
    settings = load_settings()
    progress = RunProgress(1, f"Exporting {Path(source).name} to {uri}", notify=False)

    def advance(done: int, total: int) -> None:
        progress.total = max(total, 1)
        progress.advance(done - progress.done)

    report = export_dataset(Path(source), uri, settings, include, verify, advance)
    warning = record_export(report, record_id, settings)
    logger = get_run_logger()
    logger.info(
        "exported %d files (%.1f MB) to %s: %d sent, %d already there, %.1f MB/s%s",
        report.files,
        report.bytes / 2**20,
        report.uri,
        len(report.uploaded),
        len(report.skipped),
        report.megabytes_per_s,
        ", verified" if report.verified else "",
    )
    if warning:
        logger.warning(warning)
    return export_summary(report, warning)
