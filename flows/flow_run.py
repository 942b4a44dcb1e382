"""A flow run as the catalogue and the user see it: claimed, worked in, published with its
record, summarised (the summary the CLI prints and the Prefect UI shows as a table).

A run started by an acquisition event claims the event's processing key, and every run
reserves its record in the first free version of its output folder, both as leases its
heartbeat keeps (:mod:`calypso.registry.claims`); its results are staged in its part
folder and renamed into place only with their record (:meth:`FlowRun.completed`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from calypso.errors import CalypsoError, CatalogueError, OutputError, is_ctrl_c
from calypso.flows.results_table import portal_links, publish_results_table, summary_figures
from calypso.registry import ProcessedDataset, claims, open_catalogue
from calypso.registry.access import AccessError
from calypso.registry.access.confine import still_in_proposal
from calypso.registry.access.landlock import in_proposal
from calypso.registry.access.secrets import redact
from calypso.registry.catalogue import embedded
from calypso.registry.heartbeat import Heartbeat
from calypso.settings import CalypsoSettings, load_settings
from calypso.tasks.caching import save_result_block
from calypso.tasks.catalogue import Registration, processed_record, register_processed_dataset
from calypso.tasks.writers.nexus import new_work_dir, now_iso, remove_work_dir
from calypso.tasks.writers.permissions import Permissions, output_permissions
from calypso.tasks.writers.publication import (
    PARTIAL_PREFIX,
    Publication,
    interrupts_held,
    preparing,
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
    raw: str | None = None
    export_to: str | None = None  # object-store prefix the results go to once registered
    trigger: str | None = None  # processing key of the acquisition event that started it
    exported: dict[str, Any] | None = None
    skipped_because: str | None = None
    settings: CalypsoSettings = field(default_factory=load_settings)  # read once a run
    record: ProcessedDataset | None = None  # reserved when planned
    heartbeat: Heartbeat | None = None  # keeps the claim and the reservation
    work_dir: Path | None = None
    publication: Publication | None = None  # the results staged in the work folder
    permissions: Permissions | None = None  # the results' group and modes (the proposal's)
    partial: str | None = None  # why its result is partial (a scan that ended early)
    registered: bool = False  # its record says how it ended (failed, or completed)
    _base: str = ""  # the output folder as planned, before versions

    # Confinement (issue #20): a run that an event or the Prefect UI started is checked
    # before it gets here, by the one check (calypso.registry.access.confine) that the
    # technique flow and the saved-flow flow call when a deployment started them.

    @property
    def workers(self) -> int:
        """Worker processes of a local cluster under the current settings (to size tasks)."""
        from calypso.executors import local_worker_count

        return local_worker_count(self.settings.executor)

    def planned(self, plan: Any, count: int) -> bool:
        """Record the plan, claim the triggering acquisition and reserve the run's record;
        False when the acquisition (same data, technique, flow version and parameters) was
        processed by another run already, or is being processed by a live one."""
        self.plan, self.count = plan, count
        if self.record is not None:  # another planning step of the same run
            self._follow_version(plan)
            return True
        catalogue = embedded(open_catalogue(self.settings))
        lease = self.settings.catalogue.lease_s
        took_from = None
        if self.trigger:
            taken, before = claims.claim(
                catalogue, self.trigger, self.run_id, self.technique, lease
            )
            if not taken and before.live() and run_is_over(before.flow_run_id):
                taken, before = claims.claim(
                    catalogue, self.trigger, self.run_id, self.technique, lease,
                    take_from=before.flow_run_id,
                )  # fmt: skip
            if not taken:
                self.skipped_because = (
                    f"already processed by flow run {before.flow_run_id}"
                    if before.state == "done"
                    else f"being processed by flow run {before.flow_run_id} (alive: its lease "
                    f"runs {before.expires - time.time():.0f} s more)"
                )
                get_run_logger().info("%s: %s; nothing to do", self.raw, self.skipped_because)
                return False
            if before is not None and before.flow_run_id != self.run_id:
                took_from = before.flow_run_id
                get_run_logger().warning(
                    "%s: flow run %s stopped without finishing (%s); this run processes it again",
                    self.raw, took_from,
                    "it failed" if before.state == "failed" else "killed, crashed or vanished",
                )  # fmt: skip
        self._base = plan.output_dir
        reservation = self._record([], "running", None).model_copy(
            update={"processed_path": claims.canonical(plan.output_dir)}
        )
        self.record = claims.reserve(catalogue, reservation, lease, dead=took_from)
        self._follow_version(plan)
        if took_from:  # the part folders of the run that died, in its versions' folders
            for folder in claims.folders_of(catalogue, took_from):
                _remove_part_folder(Path(folder) / f"{PARTIAL_PREFIX}{took_from}")
        self.heartbeat = Heartbeat(
            catalogue, self.run_id, self.trigger, self.record.id, lease
        ).start()
        return True

    def _follow_version(self, plan: Any) -> None:
        """Send a plan's results to the run's version of its folder (``<folder>_v<n>``)."""
        if not self.record or (self.record.version or 1) == 1:
            return
        base = self._base
        folder = claims.version_folder(base, self.record.version)
        for name in ("output_dir", "output_file"):
            value = getattr(plan, name, None)
            if isinstance(value, str) and (value == base or value.startswith(base + os.sep)):
                object.__setattr__(plan, name, folder + value[len(base) :])  # frozen ones too

    def skipped(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "flow_run_id": self.run_id,
            "input": self.raw,
            "outputs": [],
            "skipped": self.skipped_because,
        }

    def _record(
        self, outputs: list[str], status: str, message: str | None, **update: Any
    ) -> ProcessedDataset:
        """The run's catalogue record, its paths canonical (as keys are)."""
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
        output_file = getattr(self.plan, "output_file", None)
        values = {
            "raw_dataset": claims.canonical(record.raw_dataset),
            "processed_path": claims.canonical(record.processed_path),
            "outputs": [claims.canonical_url(url) for url in outputs],
            "output_file": claims.canonical(output_file) if output_file else None,
            "key": self.trigger,
        }
        if self.record is not None:
            values |= {
                "id": self.record.id,
                "version": self.record.version,
                "processed_path": self.record.processed_path,
            }
        return record.model_copy(update=values | update)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    @contextmanager
    def ending_registered(self) -> Iterator[None]:
        """The run from its planning to its publication: an error or a Ctrl-C (also one a
        library wrapped) once its record is reserved registers it failed, in
        :meth:`working` or outside it (as Prefect reports the planning task's end: the
        record said "running" until its lease ran out, 1 of 24 Ctrl-Cs of a 120-frame
        command in session 44). The one place a run's failure is registered but for its
        publication's, which says where its results wait."""
        try:
            yield
        except BaseException as exc:
            if self.record is not None and not self.registered:
                self.failed(KeyboardInterrupt() if is_ctrl_c(exc) else exc)
            raise

    def failed(self, error: BaseException) -> Registration | None:
        """Register the failure (the reservation failed, its claim free for another run);
        a catalogue that cannot be written is logged, so that ``error`` is what is raised."""
        self.registered = True  # tried once: a failure to register is logged, not retried
        self._stop_heartbeat()
        self._remove_partial_result()  # it said "running": the record says what happened
        try:
            message = (
                redact(str(error))
                if isinstance(error, Exception)
                else f"interrupted ({type(error).__name__}: Ctrl-C, or the process was told "
                "to stop) before it finished"
            )
            registration = register_processed_dataset(self._record([], "failed", message))
        except CatalogueError as exc:
            logging.getLogger(__name__).warning(
                "failure of %s not registered: %s", self.run_id, exc
            )
            return None
        self._post(registration.catalogue_id)
        return registration

    def _remove_partial_result(self) -> None:
        """A live run's partial result (``<name>.partial.h5``), once the run has ended."""
        from calypso.tasks.live_common import partial_path

        output = getattr(self.plan, "output_file", None)
        if output:  # best effort: never what a run's end reports
            with suppress(OSError, CalypsoError):
                in_proposal(output, partial_path(output).unlink, True)

    def completed(self, outputs: list[str]) -> Registration:
        """Publish the results with their record (Ctrl-C held), then export them if asked."""
        with interrupts_held():
            try:
                registration = self._publish(outputs)
            finally:
                self._stop_heartbeat()
            if self.work_dir is not None:
                _remove_part_folder(self.work_dir)
            self._remove_partial_result()  # a live run's, or one a killed live run left
        if self.export_to:
            from calypso.tasks.export import flow_export_uri
            from calypso.tasks.export.step import export_processed_dataset

            uri = flow_export_uri(self.export_to, self.plan.output_dir, self.plan.raw)
            self.exported = export_processed_dataset(
                self.plan.output_dir, uri, registration.catalogue_id
            )
        return registration

    def _publish(self, outputs: list[str]) -> Registration:
        """The record ``publishing`` (with the files' checksums), the staged results renamed
        into place, the record completed (its claim done, in the same transaction). When
        the catalogue refuses, nothing is published: the results stay staged."""
        if self.record is None:  # not planned by this class (nothing reserved)
            return register_processed_dataset(self._record(outputs, "completed", None))
        publication = self.publication or Publication(Path(self.plan.output_dir))
        checksums = publication.checksums(self.plan.output_dir)
        catalogue = embedded(open_catalogue(self.settings))
        lease = self.settings.catalogue.lease_s
        try:
            if self.heartbeat is not None and self.heartbeat.lost:
                raise CatalogueError(
                    f"flow run {self.run_id} lost its claim to {self.heartbeat.lost} (no "
                    f"heartbeat within its {lease:g} s lease: it was thought dead)"
                )
            claims.publishing(
                catalogue, self.record.id, self.run_id, self.trigger, lease, checksums
            )
        except CatalogueError as exc:
            raise self._not_published(exc, publication) from None
        try:
            still_in_proposal(self.settings, self.raw, [f.parent for _, f in publication.moves])
            publication.apply()
        except (OutputError, AccessError) as exc:  # a raw file there; a folder swapped
            publication.undo()
            self.failed(exc)
            raise
        except OSError as exc:
            publication.undo()
            error = OutputError(
                f"cannot move the results into {self.plan.output_dir}: {exc}; they stay in "
                f"{publication.staging}"
            )
            self.failed(error)
            raise error from None
        # A partial result is complete as a publication; its record says what it lacks.
        message = f"partial: {self.partial}" if self.partial else None
        record = self._record(outputs, "completed", message, checksums=checksums)
        try:
            registration = register_processed_dataset(record)
        except CatalogueError as exc:
            publication.undo()
            raise self._not_published(exc, publication) from None
        self.registered = True
        publication.commit()
        return registration

    def _not_published(self, error: CatalogueError, publication: Publication) -> CatalogueError:
        where = publication.staging if publication.moves else self.work_dir
        message = (
            f"{error}. The results of flow run {self.run_id or '(local)'} are complete but "
            f"NOT published (no record, no file in {self.plan.output_dir}): they stay in "
            f"{where}. Once the catalogue can be written, retry this flow run (Retry in the "
            "Prefect UI reuses its finished chunks) or run it again"
        )
        self.failed(CatalogueError(message))
        return CatalogueError(message)

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    @contextmanager
    def working(self) -> Iterator[str]:
        """A scratch folder in the output folder for the tasks' part files, named after the
        flow run; the writers' results are staged in it until :meth:`completed` publishes
        them, then it is removed. Used inside :meth:`ending_registered`, which registers an
        error inside the block as a failed run; the folder stays, so a retry of the run
        (same flow run id) finds the chunks that finished, whose task results are cached."""
        save_result_block()  # where the chunk tasks keep their results, for a retry
        # The results' group and mode, given before they are published.
        permissions = self.permissions = output_permissions(self.plan, self.settings)
        still_in_proposal(self.settings, self.raw, [Path(self.plan.output_dir)])
        work_dir = new_work_dir(self.plan.output_dir, self.run_id or None, permissions)
        self.work_dir = work_dir
        try:
            with preparing(work_dir, permissions) as self.publication:
                yield str(work_dir)
        except BaseException as exc:  # Ctrl-C too
            interrupted = is_ctrl_c(exc)  # one pydantic wrapped too ("... KeyboardInterrupt")
            # Kept for a retry when it holds a finished chunk, or soon may (a Ctrl-C's chunks
            # on serve's cluster finish into it); not a refused run's: refused again.
            if (
                isinstance(exc, AccessError)
                or not self.run_id
                or not (interrupted or any(p.is_file() for p in Path(work_dir).rglob("*")))
            ):
                _remove_part_folder(work_dir)
            if interrupted and isinstance(exc, Exception):  # Prefect's "interrupted" then
                raise KeyboardInterrupt from exc
            raise

    def make_step_folder(self, folder: Path) -> None:
        """A step's own scratch folder in the part folder (again for a retry of the run)."""
        assert self.permissions is not None, "a step folder is made inside working()"
        try:
            self.permissions.make_work_dir(folder, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the scratch folder {folder}: {exc}") from None

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
        publish_results_table(summary, portal_links(self.settings, self.run_id, summary))
        if warning := self._post(registration.catalogue_id, summary):
            summary["warnings"].append(warning)
        return summary

    def _post(self, record_id: int, summary: dict[str, Any] | None = None) -> str | None:
        """Post the finished run to its proposal's e-logbook (ICAT backend); a warning,
        logged, when the post waits. Never raises: a post is no reason to fail a run."""
        if self.settings.catalogue.backend != "icat":
            return None
        from calypso.registry.icat import IcatCatalogue

        try:
            catalogue = open_catalogue(self.settings)
            figures = summary_figures(summary) if summary else []
            warning = (
                catalogue.post(record_id, summary, figures)
                if isinstance(catalogue, IcatCatalogue)
                else None
            )
        except Exception as exc:
            warning = redact(f"e-logbook post of flow run {self.run_id} not made: {exc}")
        if warning:
            try:
                get_run_logger().warning("%s", warning)
            except Exception:  # no run context (a script): the summary has it
                logging.getLogger(__name__).warning("%s", warning)
        return warning


def run_is_over(run_id: str) -> bool:
    """Whether the Prefect API says flow run ``run_id`` is over (crashed, cancelled, failed,
    or finished), though its claim is still held; False when it cannot tell."""
    import uuid

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(run_id)).state
    except Exception:  # no API, or a run it does not know: the lease decides
        return False
    return state is not None and state.is_final()


def _remove_part_folder(folder: Path) -> None:
    """Remove a run's part folder, confined to its proposal: a folder above it swapped
    for a link into another proposal since the run checked it removes nothing there."""
    in_proposal(folder, remove_work_dir, folder)
