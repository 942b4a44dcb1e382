"""A finished run's results table: its outputs, key figures and catalogue id, shown in the
Prefect UI as a table artifact, with links into the portal where one is announced."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from calypso.settings import CalypsoSettings


def key_figures(values: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Scalar leaves of a summary (``report.scans.0.hit_rate`` ...), for the results table."""
    if isinstance(values, dict) and depth < 4:
        pairs = [(f"{prefix}{k}.", v) for k, v in values.items()]
    elif isinstance(values, list | tuple) and depth < 4 and len(values) <= 8:
        pairs = [(f"{prefix}{i}.", v) for i, v in enumerate(values)]
    elif isinstance(values, bool | int | float | str) or values is None:
        return [(prefix.rstrip("."), values)]
    else:
        return []
    found = []
    for name, value in pairs:
        found += key_figures(value, name, depth + 1)
    return found


_NOT_FIGURES = (
    *("timings_s", "outputs", "warnings", "geometry", "parameters", "export"),
    *("technique", "flow_run_id", "processed_dataset_dir", "catalogue_id"),
    *("unit", "count", "per_s", "frames_per_s"),  # in the throughput row
)


def summary_figures(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The key figures of a run's summary (frames, E0, hit rate ...), as (name, value)."""
    return key_figures({k: v for k, v in summary.items() if k not in _NOT_FIGURES})


def portal_path(settings: CalypsoSettings, path: str) -> str | None:
    """``<proposal>/<relative>`` of a path under the data roots: where the portal shows it."""
    if not path:
        return None
    real = Path(path).absolute()
    for root in settings.data_roots:
        root = Path(root).absolute()
        if real.is_relative_to(root) and real != root:
            return str(real.relative_to(root))
    return None


def portal_links(settings: CalypsoSettings, run_id: str, summary: dict[str, Any]) -> list[dict]:
    """Rows of the results table that open the run and its results in the portal (issue
    #21), where one is announced (``portal.public_url``)."""
    base = (settings.portal.public_url or "").rstrip("/")
    if not base:
        return []
    rows = [{"item": "this run in the portal", "value": f"{base}/runs/{run_id}"}]
    if folder := portal_path(settings, summary.get("processed_dataset_dir") or ""):
        rows.append({"item": "its results in the portal", "value": f"{base}/folder/{folder}"})
    return rows


def publish_results_table(summary: dict[str, Any], links: list[dict] | None = None) -> None:
    """The run's outputs, key figures and catalogue id as a table artifact in the UI."""
    rows = [*(links or []), *({"item": "output", "value": url} for url in summary["outputs"])]
    rows.append({"item": "processed_dataset_dir", "value": summary["processed_dataset_dir"]})
    rows.append({"item": "catalogue_id", "value": summary["catalogue_id"]})
    rows.append(
        {"item": f"{summary['unit']} per s", "value": f"{summary['per_s']} ({summary['count']})"}
    )
    for name, value in summary_figures(summary):
        rows.append({"item": name, "value": value if value is not None else ""})
    if summary.get("export"):
        rows.append({"item": "exported to", "value": summary["export"]["uri"]})
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=rows[:60],
            key=f"calypso-{summary['technique']}-results",
            description=f"{summary['technique']} results of {summary['input']}",
        )
    except Exception:  # no Prefect API to report to: the results themselves are written
        logging.getLogger(__name__).debug("results table not published", exc_info=True)
