"""ICAT as a catalogue backend, through pyicat-plus, with a durable outbox.

Every registration is first recorded in the embedded SQLite catalogue, and a
completed one is owed to ICAT in its outbox. Delivery is attempted at once;
when the broker cannot be reached or does not confirm, the registration stays
pending (the flow run still succeeds, with a warning) until a later flush
(``calypso catalogue flush``, or ``calypso serve``'s periodic one) sends it.

Delivery is confirmed: each message goes with ``content-length``, a stable
message id (``calypso_message_id``, the same on every attempt) and a STOMP
``receipt``, and is marked delivered only when the broker's RECEIPT arrives.
An entry is leased to one sender at a time (:meth:`SQLiteCatalogue.claim`);
a sender that dies leaves a lease that runs out, and the entry is sent again,
with the same message id, so an ingester can drop the copy.

The proposal's e-logbook (ICAT+) gets each finished run's summary through the same
outbox (:mod:`calypso.registry.elogbook`), delivered by the same flushes.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import calypso
from calypso.errors import CatalogueError, ConfigurationError
from calypso.registry import elogbook
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
# The STOMP header naming a message: its outbox entry's message id, the same on every
# attempt, so the copy a crash after sending (before the receipt) leads to is recognisable.
MESSAGE_ID_HEADER = "calypso_message_id"
# A sender holds an entry for the wait for its receipt (``timeout_s``) and this margin for
# the SQLite writes around it; the lease is renewed just before sending.
LEASE_MARGIN_S = 10.0
# What goes over STOMP: registrations, then notes (sent after them, so ICAT knows the
# dataset); and everything a flush delivers, e-logbook posts (over ICAT+) last.
BROKER_DESTINATIONS = (DESTINATION, METADATA_DESTINATION)
ALL_DESTINATIONS = (*BROKER_DESTINATIONS, elogbook.DESTINATION)


@dataclass
class FlushReport:
    """What one delivery round did: records whose registration or note was delivered,
    records whose e-logbook post was posted, records with something still owed."""

    delivered: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    error: str | None = None
    posted: list[int] = field(default_factory=list)


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
        self.lease_s = settings.timeout_s + LEASE_MARGIN_S
        self.last_warning: str | None = None

    def register(self, record: ProcessedDataset) -> int:
        """Record the dataset; if complete, owe it to ICAT and try to deliver it now."""
        self.last_warning = None
        payload = icat_payload(record, self.settings) if record.status == "completed" else None
        if record.id is not None:  # a reserved record: completed with its outbox entry, at once
            owed = [(DESTINATION, payload)] if payload is not None else []
            record_id = self.local.register(record, owed=owed)
            sent = bool(owed)
        else:
            record_id = self.local.register(record)
            sent = payload is not None and self.local.enqueue(record_id, DESTINATION, payload)
        if sent:
            report = self.flush(destinations=BROKER_DESTINATIONS)
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
        """What is owed to ICAT (``pending``: waiting, or being sent and not yet confirmed),
        or ``delivered`` (confirmed by the broker), or everything."""
        return self.local.outbox("owed" if state == "pending" else state)

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
            report = self.flush(destinations=BROKER_DESTINATIONS)
            if report.error:
                return (
                    f"ICAT note {name} of {record.processed_path} is waiting in the outbox "
                    f"({report.error}); deliver it with `calypso catalogue flush`"
                )
        return None

    def post(
        self,
        record_id: int,
        summary: dict[str, Any] | None = None,
        figures: Iterable[tuple[str, Any]] = (),
    ) -> str | None:
        """Owe the proposal's e-logbook the posts of a finished run (its record completed
        or failed; ``summary`` and ``figures``, what the run reports), and try to post
        them now; a warning when they are left waiting in the outbox."""
        if not elogbook.enabled(self.settings):
            return None
        record = self.local.get(record_id)
        portal = self.settings.portal_url or _prefect_ui_url()
        run_url = (
            f"{portal.rstrip('/')}/runs/flow-run/{record.flow_run_id}"
            if portal and record.flow_run_id
            else None
        )
        owed = False
        for kind, payload in elogbook.run_posts(record, summary, figures, run_url):
            # One post of each kind per record and outcome: a retry posts nothing again.
            key = f"{elogbook.DESTINATION}:{record_id}:{record.status}:{kind}"
            owed |= self.local.enqueue(record_id, elogbook.DESTINATION, payload, key=key)
        if not owed:
            return None
        report = self.flush(destinations=(elogbook.DESTINATION,))
        if record_id in report.pending:
            return (
                f"e-logbook post of {record.processed_path} is waiting in the outbox "
                f"({report.error}); deliver it with `calypso catalogue flush`"
            )
        return None

    def flush(
        self, release_stale: bool = False, destinations: Iterable[str] = ALL_DESTINATIONS
    ) -> FlushReport:
        """Deliver what is owed to ``destinations``: registrations then notes, oldest
        first, until one fails; then e-logbook posts (:func:`elogbook.deliver`), whatever
        the broker did.

        Each entry is leased to this call, sent once its lease is renewed, and marked
        delivered on the broker's receipt; a refusal, a disconnection or no receipt within
        ``timeout_s`` leaves it pending for a later flush. ``release_stale`` shows entries
        whose sender died (lease run out) as pending again; a live sender's are left alone.
        """
        destinations = tuple(destinations)
        if release_stale:
            for destination in destinations:
                self.local.release_stale(destination)
        report = FlushReport()
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        broker = [d for d in BROKER_DESTINATIONS if d in destinations]
        if broker:
            self._send(broker, owner, report)
        if elogbook.DESTINATION in destinations:
            report.posted, error = elogbook.deliver(self.local, self.settings, owner, self.lease_s)
            if error:
                error = f"e-logbook: {error}"
                report.error = f"{report.error}; {error}" if report.error else error
        report.pending = [
            e.record_id for e in self.local.outbox("owed") if e.destination in destinations
        ]
        return report

    def _send(self, destinations: list[str], owner: str, report: FlushReport) -> None:
        """Send what is owed to the broker, oldest first, until one fails."""
        messages: _Messages | None = None
        sender: _ConfirmedSender | None = None
        try:
            for destination in destinations:
                while report.error is None and (
                    entry := self.local.claim(destination, owner, self.lease_s)
                ):
                    try:
                        if messages is None:
                            messages = _Messages(self.settings)
                        body = messages.build(destination, entry.payload)
                        if sender is None:
                            sender = _ConfirmedSender(self.settings)
                        if not self.local.renew(entry.id, owner, self.lease_s):
                            continue  # the lease ran out while connecting: someone else sends
                        sender.send(
                            messages.queue(destination),
                            body,
                            entry.message_id or "",
                            receipt=f"{entry.message_id}-{entry.attempts}",
                        )
                    except Exception as exc:
                        report.error = f"{type(exc).__name__}: {exc}"
                        self.local.settle(entry.id, error=report.error, owner=owner)
                        break
                    self.local.settle(entry.id)
                    report.delivered.append(entry.record_id)
        finally:
            if sender is not None:
                sender.close()

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


class _Kept:
    """Stands in for pyicat-plus' messaging client: keeps the bytes it is asked to send."""

    def __init__(self) -> None:
        self.data: bytes | None = None

    def send(self, data: bytes) -> None:
        self.data = data

    def reconnect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


class _Messages:
    """ICAT's messages, built by pyicat-plus itself.

    pyicat-plus' messaging client (stompest) sends without ``content-length`` and asks for
    no receipt, and its API has no way to ask for one. So Calypso lets pyicat-plus' own
    ``IcatClient.store_processed_data`` and ``update_metadata`` build each message (the XML
    of a dataset, the JSON of a metadata update: nothing rewritten here), with their
    messaging clients swapped for one that keeps the bytes, and sends those bytes itself
    (:class:`_ConfirmedSender`) to the queue pyicat-plus would send them to.
    """

    def __init__(self, settings: IcatSettings) -> None:
        from pyicat_plus.client import defaults
        from pyicat_plus.client.main import IcatClient

        self.kept = _Kept()
        self.client = IcatClient(
            metadata_urls=list(settings.metadata_urls),
            metadata_queue=settings.metadata_queue,
            update_metadata_urls=list(settings.metadata_urls),
        )
        for inner in (self.client._metadata_client, self.client._update_metadata_client):
            inner._client = self.kept  # its own, never connected, is dropped
        # IcatMessagingClient sends to "/queue/" + its queue name.
        self.queues = {
            DESTINATION: f"/queue/{settings.metadata_queue}",
            METADATA_DESTINATION: f"/queue/{defaults.UPDATE_METADATA_QUEUE}",
        }

    def queue(self, destination: str) -> str:
        return self.queues[destination]

    def build(self, destination: str, payload: dict[str, Any]) -> bytes:
        self.kept.data = None
        if destination == DESTINATION:
            self.client.store_processed_data(**payload)
        else:
            self.client.update_metadata(**payload)
        if self.kept.data is None:
            raise CatalogueError(f"pyicat-plus built no {destination} message from {payload}")
        return self.kept.data


class _ConfirmedSender:
    """One STOMP connection (stompest, the STOMP library pyicat-plus sends with) on which
    each message waits for the broker's RECEIPT before the next is sent."""

    def __init__(self, settings: IcatSettings) -> None:
        from pyicat_plus.utils.url import normalize_url
        from stompest.config import StompConfig
        from stompest.error import StompConnectionError
        from stompest.protocol import StompSpec
        from stompest.sync import Stomp

        urls = [
            normalize_url(url, default_scheme="tcp", default_port=61613)
            for url in settings.metadata_urls
        ]
        # Each broker once, in random order (as pyicat-plus); the outbox retries later.
        uri = (
            f"failover:({','.join(urls)})?randomize=true,initialReconnectDelay=100,"
            f"startupMaxReconnectAttempts={len(urls) - 1}"
        )
        self.timeout_s = settings.timeout_s
        self.client = Stomp(StompConfig(uri, version=StompSpec.VERSION_1_1))
        try:
            self.client.connect(
                versions=[StompSpec.VERSION_1_1],
                connectTimeout=self.timeout_s,
                connectedTimeout=self.timeout_s,
            )
        except StompConnectionError as exc:
            raise ConnectionError(f"no broker answers at {', '.join(urls)} ({exc})") from None

    def send(self, queue: str, body: bytes, message_id: str, receipt: str) -> None:
        """Send ``body``; return when the broker confirms it, else raise."""
        from stompest.protocol import StompSpec

        headers = {
            # Without it a broker must find the body's end by its NUL byte; coilmq (the test
            # broker) then fails on a frame split across its reads and drops the connection.
            StompSpec.CONTENT_LENGTH_HEADER: str(len(body)),
            "persistent": "true",  # as pyicat-plus: ActiveMQ keeps it on disk
            MESSAGE_ID_HEADER: message_id,
        }
        self.client.send(queue, body=body, headers=headers, receipt=receipt)
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.client.canRead(left):
                raise TimeoutError(f"the broker did not confirm within {self.timeout_s:g} s")
            frame = self.client.receiveFrame()
            if frame.command == StompSpec.ERROR:
                raise ConnectionError(
                    f"the broker refused the message: {frame.headers.get('message', frame.body)}"
                )
            if frame.command == StompSpec.RECEIPT and self.client.receipt(frame) == receipt:
                return

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # the broker went: close our end
            with suppress(Exception):
                self.client.close(flush=True)
