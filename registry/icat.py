"""ICAT as a catalogue backend, through pyicat-plus, with a durable outbox.

Every registration is first recorded in the embedded SQLite catalogue, and a
completed one is owed to ICAT in its outbox. Delivery is attempted at once;
when the broker cannot be reached the registration stays pending (the flow
run still succeeds, with a warning) until ``calypso catalogue flush`` sends
it. An outbox entry is claimed by one sender at a time and marked delivered
as soon as the broker has it, so each registration is sent once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import calypso
from calypso.errors import CatalogueError, ConfigurationError
from calypso.registry.catalogue import (
    ExportRecord,
    OutboxEntry,
    ProcessedDataset,
    SQLiteCatalogue,
)
from calypso.settings import IcatSettings

DESTINATION = "icat"
# Later notes on a registered dataset (e.g. where it was exported), sent after
# every pending registration, so ICAT already knows the dataset.
METADATA_DESTINATION = "icat-metadata"


@dataclass
class FlushReport:
    """What one delivery round did."""

    delivered: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    error: str | None = None


def icat_payload(record: ProcessedDataset, settings: IcatSettings) -> dict[str, Any]:
    """The arguments of ``IcatClient.store_processed_data`` for a processed dataset."""
    missing = [
        name
        for name, value in (
            ("proposal", record.proposal),
            ("beamline", record.beamline),
            ("sample name", record.sample_name),
        )
        if not value
    ]
    if missing:
        raise CatalogueError(
            f"{record.raw_dataset}: cannot register in ICAT without {', '.join(missing)}; "
            "ICAT needs a raw dataset of the data policy whose Bliss file names its sample "
            "(N.1/sample/name)"
        )
    metadata: dict[str, Any] = {
        "Sample_name": record.sample_name,
        "startDate": record.started,
        "endDate": record.finished,
        "Process_program": "calypso",
        "Process_version": calypso.__version__,
        "Process_note": json.dumps(
            {"parameters": record.parameters, "software": record.software},
            sort_keys=True,
            default=str,
        ),
        "Workflow_name": record.technique,
        "Workflow_id": record.flow_run_id or "",
        "Workflow_status": record.status,
    }
    portal = settings.portal_url or _prefect_ui_url()
    if portal and record.flow_run_id:
        metadata["Notes_note_00"] = f"{portal.rstrip('/')}/runs/flow-run/{record.flow_run_id}"
    return {
        "beamline": record.beamline,
        "proposal": record.proposal,
        "dataset": record.technique,
        "path": record.processed_path,
        "raw": [record.raw_dataset],
        "metadata": {k: v for k, v in metadata.items() if v not in (None, "")},
    }


def _prefect_ui_url() -> str | None:
    """The Prefect UI that shows the flow runs, from PREFECT_UI_URL or PREFECT_API_URL."""
    ui, api = os.environ.get("PREFECT_UI_URL"), os.environ.get("PREFECT_API_URL")
    if ui:
        return ui
    return api.removesuffix("/").removesuffix("/api") if api else None


class IcatCatalogue:
    """Records locally, delivers to ICAT; the SQLite catalogue is record and outbox."""

    def __init__(self, local: SQLiteCatalogue, settings: IcatSettings) -> None:
        if not settings.metadata_urls:
            raise ConfigurationError(
                "the ICAT catalogue needs its message broker: set "
                'CALYPSO_CATALOGUE__ICAT__METADATA_URLS=["host:61613"]'
            )
        self.local = local
        self.settings = settings
        self.last_warning: str | None = None

    def register(self, record: ProcessedDataset) -> int:
        """Record the dataset; if complete, owe it to ICAT and try to deliver it now."""
        self.last_warning = None
        payload = icat_payload(record, self.settings) if record.status == "completed" else None
        record_id = self.local.register(record)
        if payload is not None and self.local.enqueue(record_id, DESTINATION, payload):
            report = self.flush()
            if record_id in report.pending:
                self.last_warning = (
                    f"ICAT registration of {record.processed_path} is waiting in the outbox "
                    f"({report.error}); deliver it with `calypso catalogue flush`"
                )
        return record_id

    def get(self, record_id: int) -> ProcessedDataset:
        return self.local.get(record_id)

    def list(self, technique: str | None = None, limit: int = 50) -> list[ProcessedDataset]:
        return self.local.list(technique, limit)

    def claim_processing(self, key: str, flow_run_id: str, technique: str) -> str | None:
        return self.local.claim_processing(key, flow_run_id, technique)

    def record_export(self, export: ExportRecord) -> int:
        return self.local.record_export(export)

    def exports(
        self, record_id: int | None = None, source: str | None = None
    ) -> list[ExportRecord]:
        return self.local.exports(record_id, source)

    def find_by_processed_path(self, path: str) -> ProcessedDataset | None:
        return self.local.find_by_processed_path(path)

    def outbox(self, state: str | None = None) -> list[OutboxEntry]:
        """What is owed to ICAT (``pending``), delivered or given up."""
        return self.local.outbox(state)

    def note(self, record_id: int, key: str, name: str, value: str) -> str | None:
        """Owe ICAT a metadata update of ``record_id``'s dataset (``name = value``), try to
        send it now; a warning when it is left waiting in the outbox."""
        record = self.local.get(record_id)
        payload = {
            "proposal": record.proposal,
            "beamline": record.beamline,
            "dataset_paths": [record.processed_path],
            "metadata_name": name,
            "metadata_value": value,
        }
        if not (record.proposal and record.beamline):
            return f"{record.processed_path} has no proposal or beamline: ICAT not told"
        if self.local.enqueue(record_id, METADATA_DESTINATION, payload, key=key):
            report = self.flush()
            if report.error:
                return (
                    f"ICAT note {name} of {record.processed_path} is waiting in the outbox "
                    f"({report.error}); deliver it with `calypso catalogue flush`"
                )
        return None

    def flush(self, release_stale: bool = False) -> FlushReport:
        """Deliver pending registrations, then pending notes, oldest first, until one fails."""
        if release_stale:
            self.local.release_stale(DESTINATION)
            self.local.release_stale(METADATA_DESTINATION)
        report = FlushReport()
        client = None
        try:
            for destination in (DESTINATION, METADATA_DESTINATION):
                while report.error is None and (entry := self.local.claim(destination)):
                    try:
                        if client is None:
                            client = self._client()
                        if destination == DESTINATION:
                            client.store_processed_data(**entry.payload)
                        else:
                            client.update_metadata(**entry.payload)
                    except Exception as exc:
                        report.error = f"{type(exc).__name__}: {exc}"
                        self.local.settle(entry.id, error=report.error)
                        break
                    self.local.settle(entry.id)
                    report.delivered.append(entry.record_id)
        finally:
            if client is not None:
                client.disconnect()
        report.pending = [e.record_id for e in self.local.outbox("pending")]
        return report

    def check(self) -> list[tuple[str, bool, str]]:
        """Whether the broker answers, the ingester consumes its queue, and ICAT+ answers."""
        from stompest.error import StompConnectionError

        brokers = ", ".join(self.settings.metadata_urls)
        queue = self.settings.metadata_queue
        results: list[tuple[str, bool, str]] = []
        client = self._client()
        try:
            client._metadata_client.check_health()  # connects, then counts queue consumers
            results += [("broker", True, brokers), ("ingester", True, f"{queue} is consumed")]
        except StompConnectionError as exc:
            results.append(("broker", False, f"{brokers} cannot be reached: {exc}"))
        except Exception as exc:
            results += [("broker", True, brokers), ("ingester", False, f"{queue}: {exc}")]
        finally:
            client.disconnect()
        if self.settings.icatplus_url:
            import requests

            try:
                status = requests.get(self.settings.icatplus_url, timeout=self.settings.timeout_s)
                results.append(
                    ("icat+", True, f"{self.settings.icatplus_url} ({status.status_code})")
                )
            except requests.RequestException as exc:
                results.append(("icat+", False, f"{self.settings.icatplus_url}: {exc}"))
        return results

    def require_investigation(self, beamline: str, proposal: str) -> None:
        """Refuse a proposal that ICAT+ says has no investigation on this beamline now.

        Without ICAT+ configured (URL and token), or when it does not answer,
        nothing is refused: the outbox keeps the registration until it can be
        delivered.
        """
        if not (self.settings.icatplus_url and self.settings.icatplus_token):
            return
        client = self._client()
        try:
            info = client.investigation_info(
                beamline=beamline, proposal=proposal, timeout=self.settings.timeout_s
            )
        except Exception:
            return
        finally:
            client.disconnect()
        if info == {}:
            raise CatalogueError(
                f"proposal {proposal} has no investigation on {beamline} in ICAT "
                f"({self.settings.icatplus_url}): check the proposal and beamline in the "
                "data path, or register with the sqlite catalogue"
            )

    def _client(self):
        from pyicat_plus.client.main import IcatClient

        token = self.settings.icatplus_token
        return IcatClient(
            metadata_urls=list(self.settings.metadata_urls),
            metadata_queue=self.settings.metadata_queue,
            metadata_queue_monitor_port=self.settings.queue_monitor_port,
            update_metadata_urls=list(self.settings.metadata_urls),
            elogbook_url=self.settings.icatplus_url,
            elogbook_token=token.get_secret_value() if token else None,
            elogbook_timeout=self.settings.timeout_s,
            queue_timeout=self.settings.timeout_s,
        )
