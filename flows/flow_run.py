"""A flow run as the catalogue and the user see it: claimed, worked in, registered,
summarised (the summary the CLI prints and the Prefect UI shows as a table)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from calypso.registry import open_catalogue
from calypso.settings import CalypsoSettings, load_settings
from calypso.tasks.catalogue import Registration, processed_record, register_processed_dataset
from calypso.tasks.writers.nexus import new_work_dir, now_iso, remove_work_dir


@dataclass
class FlowRun:
    """A flow run as the catalogue sees it: started when created, registered once it
    failed or completed."""

    technique: str
    run_id: str = field(default_factory=lambda: str(flow_run.get_id() or ""))
    started: str = field(default_factory=now_iso)
    clock: float = field(default_factory=time.perf_counter)
    plan: Any = None
    count: int = 0
    raw: str | None = None
    export_to: str | None = None  # object-store prefix the results go to once registered
    trigger: str | None = None  # processing key of the acquisition event that started it
    exported: dict[str, Any] | None = None
    skipped_because: str | None = None
    settings: CalypsoSettings = field(default_factory=load_settings)  # read once a run

    def __post_init__(self) -> None:
        if self.trigger and self.raw:
            # An event can name any path: only data under the configured roots is read.
            from calypso.flows.online.acquisitions import require_inside_roots

            require_inside_roots(self.raw, self.settings.data_roots)

    @property
    def workers(self) -> int:
        """Worker processes of a local cluster under the current settings (to size tasks)."""
        from calypso.executors import local_worker_count

        return local_worker_count(self.settings.executor)

    def planned(self, plan: Any, count: int) -> bool:
        """Record the plan; False when the triggering acquisition (same data, technique,
        flow version and parameters) was processed by another run already."""
        self.plan, self.count = plan, count
        if not self.trigger:
            return True
        holder = open_catalogue(self.settings).claim_processing(
            self.trigger, self.run_id, self.technique
        )
        if holder is None:
            return True
        self.skipped_because = f"already processed by flow run {holder}"
        get_run_logger().info("%s: %s; nothing to do", self.raw, self.skipped_because)
        return False

    def skipped(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "flow_run_id": self.run_id,
            "input": self.raw,
            "outputs": [],
            "skipped": self.skipped_because,
        }

    def _register(self, outputs: list[str], status: str, message: str | None) -> Registration:
        record = processed_record(
            self.technique,
            self.plan,
            self.count,
            run_id=self.run_id,
            started=self.started,
            clock=self.clock,
            outputs=outputs,
            status=status,
            message=message,
        )
        return register_processed_dataset(record)

    def failed(self, error: BaseException) -> Registration:
        return self._register([], "failed", str(error))

    def completed(self, outputs: list[str]) -> Registration:
        """Register the results; then export them when the run was asked to."""
        registration = self._register(outputs, "completed", None)
        if self.export_to:
            from calypso.tasks.export import flow_export_uri
            from calypso.tasks.export.step import export_processed_dataset

            uri = flow_export_uri(self.export_to, self.plan.output_dir, self.plan.raw)
            self.exported = export_processed_dataset(
                self.plan.output_dir, uri, registration.catalogue_id
            )
        return registration

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    @contextmanager
    def working(self) -> Iterator[str]:
        """A scratch folder in the output folder for the tasks' part files, named after the
        flow run and removed once it completes. An error inside the block is registered
        as a failed run, then raised; the folder stays, so a retry of the run (same flow
        run id) finds the chunks that finished, whose task results are cached."""
        work_dir = new_work_dir(self.plan.output_dir, self.run_id or None)
        try:
            yield str(work_dir)
        except Exception as exc:
            self.failed(exc)
            if not self.run_id:
                remove_work_dir(work_dir)
            raise
        remove_work_dir(work_dir)

    def summary(
        self,
        raw: str,
        outputs: list[str],
        registration: Registration,
        *,
        unit: str,
        tasks: int,
        timings: dict[str, float],
        warnings: list[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """What the flow returns (and the CLI prints): the same keys for every technique;
        also shown in the Prefect UI as the run's table artifact. ``warnings``: what the
        steps found doubtful in the results (the registration's warning follows)."""
        total = self.elapsed()
        summary = {
            "technique": self.technique,
            "flow_run_id": self.run_id,
            "input": raw,
            "outputs": outputs,
            "processed_dataset_dir": self.plan.output_dir,
            "unit": unit,
            "count": self.count,
            "tasks": tasks,
            **extra,
            "catalogue_id": registration.catalogue_id,
            **({"export": self.exported} if self.exported else {}),
            "warnings": [
                *(warnings or []),
                *([registration.warning] if registration.warning else []),
            ],
            "timings_s": {"total": round(total, 3)}
            | {name: round(value, 3) for name, value in timings.items()},
            "per_s": round(self.count / max(total, 1e-9), 2),
        }
        publish_results_table(summary)
        return summary


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


def publish_results_table(summary: dict[str, Any]) -> None:
    """The run's outputs, key figures and catalogue id as a table artifact in the UI."""
    rows = [{"item": "output", "value": url} for url in summary["outputs"]]
    rows.append({"item": "processed_dataset_dir", "value": summary["processed_dataset_dir"]})
    rows.append({"item": "catalogue_id", "value": summary["catalogue_id"]})
    rows.append(
        {"item": f"{summary['unit']} per s", "value": f"{summary['per_s']} ({summary['count']})"}
    )
    figures = {k: v for k, v in summary.items() if k not in _NOT_FIGURES}
    for name, value in key_figures(figures):
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
