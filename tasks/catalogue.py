"""Task that registers a processed dataset in the configured catalogue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from calypso.registry import ProcessedDataset, open_catalogue
from calypso.settings import load_settings
from calypso.tasks.data_policy import RawDataset
from calypso.tasks.nexus import new_work_dir, now_iso, remove_work_dir, software_versions


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
    export_to: str | None = None  # object-store prefix the results go to once registered
    exported: dict[str, Any] | None = None

    @property
    def workers(self) -> int:
        """Worker processes of a local cluster under the current settings (to size tasks)."""
        from calypso.executors import local_worker_count

        return local_worker_count(load_settings().executor)

    def planned(self, plan: Any, count: int) -> None:
        self.plan, self.count = plan, count

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
            from calypso.tasks.export_step import export_processed_dataset

            uri = flow_export_uri(self.export_to, self.plan.output_dir, self.plan.raw)
            self.exported = export_processed_dataset(
                self.plan.output_dir, uri, registration.catalogue_id
            )
        return registration

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    @contextmanager
    def working(self) -> Iterator[str]:
        """A scratch folder in the output folder for the tasks' part files, removed at the
        end; an error inside the block is registered as a failed run, then raised."""
        work_dir = new_work_dir(self.plan.output_dir)
        try:
            yield str(work_dir)
        except Exception as exc:
            self.failed(exc)
            raise
        finally:
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
        **extra: Any,
    ) -> dict[str, Any]:
        """What the flow returns (and the CLI prints): the same keys for every technique."""
        total = self.elapsed()
        return {
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
            "warnings": [registration.warning] if registration.warning else [],
            "timings_s": {"total": round(total, 3)}
            | {name: round(value, 3) for name, value in timings.items()},
            "per_s": round(self.count / max(total, 1e-9), 2),
        }
