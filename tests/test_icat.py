"""ICAT registration against the real test servers shipped with pyicat-plus[test]
(tests/icat_servers.py).

The STOMP broker (coilmq), the ICAT ingester emulator and the ICAT+ REST
emulator run as processes on loopback; the broker is stopped and started on
the same port to test the outbox. The ingester is the plugin's, recognising a
message id it already took (tests/icat_ingester.py), as a real one must: its
records count datasets, and the copies it dropped are listed. A TCP relay
holding back the broker's receipts stands for a broker slow to confirm.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress

import pytest

pytest.importorskip("pyicat_plus_pytest_plugin")

from calypso.flows.api import run_technique
from calypso.flows.cli import main
from calypso.registry import ProcessedDataset, SQLiteCatalogue
from calypso.registry.icat import DESTINATION, IcatCatalogue, icat_payload
from calypso.settings import IcatSettings, load_settings
from calypso.techniques.diffraction import DiffractionParameters
from tests.icat_servers import IcatServers, running_icat, use_icat, wait_for

# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]


class SlowReceipts:
    """A TCP relay to the broker that holds back the broker's RECEIPT frames, ``delay_s``
    each, or (None) until :meth:`close`; what the client sends passes at once."""

    def __init__(self, broker_port: int, delay_s: float | None = None) -> None:
        self.broker_port, self.delay_s = broker_port, delay_s
        self.held = threading.Event()  # a receipt has reached the relay
        self.receipts = 0
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                broker = socket.create_connection(("127.0.0.1", self.broker_port))
                for ends in ((client, broker, False), (broker, client, True)):
                    threading.Thread(target=self._pipe, args=ends, daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, from_broker: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if from_broker and b"RECEIPT" in data:
                    self.receipts += 1
                    self.held.set()
                    self.released.wait(self.delay_s)
                target.sendall(data)
        for end in (source, target):  # one side went: so does the other
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.released.set()
        self.listener.close()


@pytest.fixture(scope="module")
def icat(tmp_path_factory):
    with running_icat(tmp_path_factory.mktemp("icat")) as servers:
        yield servers


@pytest.fixture
def icat_env(icat, monkeypatch, tmp_path):
    return use_icat(icat, monkeypatch, tmp_path / "catalogue.sqlite")


def reduce(sample, scheduler: str, output=None):
    parameters = DiffractionParameters(
        poni=str(sample.calibration["poni"]), mask=str(sample.calibration["mask"]), npt=200
    )
    settings = load_settings(executor={"kind": "address", "address": scheduler})
    return run_technique(
        "diffraction", str(sample.raw_dataset_dir), parameters, None, output, settings
    )


def test_flow_run_registers_the_processed_dataset_in_icat(
    icat, icat_env, diffraction_sample, scheduler
):
    summary = reduce(diffraction_sample, scheduler)
    assert summary["warnings"] == []
    processed = summary["processed_dataset_dir"]
    assert wait_for(lambda: any(d["location"] == processed for d in icat.datasets()))
    [dataset] = [d for d in icat.datasets() if d["location"] == processed]
    assert dataset["investigation"]["name"] == "ih0001" and dataset["instrument"] == "id00"
    assert dataset["name"] == "diffraction" and dataset["sample"]["name"] == "CeO2"
    parameters = {p["name"]: p["value"] for p in dataset["parameters"]}
    assert parameters["input_datasets"] == str(diffraction_sample.raw_dataset_dir)
    assert parameters["Workflow_id"] == summary["flow_run_id"]
    assert parameters["Process_program"] == "calypso"
    note = json.loads(parameters["Process_note"])
    assert note["parameters"]["npt"] == 200 and "pyFAI" in note["software"]
    api = os.environ["PREFECT_API_URL"].removesuffix("/api")
    assert parameters["Notes_note_00"] == f"{api}/runs/flow-run/{summary['flow_run_id']}"
    record = SQLiteCatalogue(icat_env).get(summary["catalogue_id"])
    assert dataset["startDate"][:19] == record.started[:19].replace("+00:00", "")
    assert SQLiteCatalogue(icat_env).outbox("pending") == []
    # ICAT+ answered: the run's e-logbook posts went at its end, at the first attempt
    # (what they hold, and when ICAT+ does not answer: tests/test_elogbook.py).
    posts = [e for e in SQLiteCatalogue(icat_env).outbox() if e.destination == "icat-elogbook"]
    assert [(e.payload["kind"], e.state, e.attempts) for e in posts] == [
        ("message", "delivered", 1),
        ("image", "delivered", 1),
    ]


def test_broker_down_the_run_succeeds_and_flush_delivers_once(
    icat, icat_env, diffraction_sample, tmp_path, capsys, scheduler
):
    icat.stop_broker()
    try:
        summary = reduce(diffraction_sample, scheduler)
    finally:
        icat.start_broker()
    [warning] = summary["warnings"]
    assert "waiting in the outbox" in warning and "calypso catalogue flush" in warning
    assert main(["catalogue", "list", "--pending"]) == 0
    assert summary["processed_dataset_dir"] in capsys.readouterr().out
    before = [
        d
        for d in icat.datasets()
        if d.get("parameters") and _workflow_id(d) == summary["flow_run_id"]
    ]
    assert before == []
    assert main(["catalogue", "flush"]) == 0
    assert "delivered 1 registration(s) to ICAT; 0 pending" in capsys.readouterr().out
    assert wait_for(lambda: _count(icat, summary["flow_run_id"]) == 1)
    assert main(["catalogue", "flush"]) == 0  # nothing more to send
    assert "delivered 0" in capsys.readouterr().out
    assert _count(icat, summary["flow_run_id"]) == 1


def test_an_export_is_noted_on_the_icat_dataset(
    icat, icat_env, diffraction_sample, tmp_path, scheduler
):
    summary = reduce(diffraction_sample, scheduler)
    processed = summary["processed_dataset_dir"]
    target = tmp_path / "exported"
    for _ in range(2):  # the same export twice: ICAT is told once
        assert main(["export", str(summary["catalogue_id"]), "--to", str(target)]) == 0
    message = json.loads(icat.updates.get(timeout=20))
    assert message == {
        "proposal": "ih0001",
        "beamline": "id00",
        "datasetPaths": [processed],
        "metadataName": "Notes_note_01",
        "metadataValue": f"exported to {target} (SHA-256 manifest {target}/MANIFEST.sha256)",
    }
    with pytest.raises(queue.Empty):
        icat.updates.get(timeout=2)
    assert SQLiteCatalogue(icat_env).outbox("pending") == []
    assert len(SQLiteCatalogue(icat_env).exports(record_id=summary["catalogue_id"])) == 2


def _workflow_id(dataset: dict) -> str | None:
    return {p["name"]: p["value"] for p in dataset["parameters"]}.get("Workflow_id")


def _count(icat: IcatServers, workflow_id: str) -> int:
    return sum(1 for d in icat.datasets() if _workflow_id(d) == workflow_id)


def test_broker_killed_during_a_burst_of_twenty(icat, icat_env):
    catalogue = IcatCatalogue(SQLiteCatalogue(icat_env), icat.settings())
    ids = []
    for index in range(20):
        if index == 7:
            # coilmq keeps messages in memory (ActiveMQ persists them): let the ingester
            # take what the broker already has, then kill the broker mid-burst
            assert wait_for(lambda: all(_count(icat, f"burst-{i}") == 1 for i in range(7)))
            icat.stop_broker()
        ids.append(
            catalogue.register(
                ProcessedDataset(
                    technique="diffraction",
                    raw_dataset=f"/data/visitor/ih0002/id00/20261125/RAW_DATA/s/s_{index:04d}",
                    processed_path=f"/data/visitor/ih0002/id00/20261125/PROCESSED_DATA/s/s_{index:04d}",
                    proposal="ih0002",
                    beamline="id00",
                    sample_name="burst",
                    flow_run_id=f"burst-{index}",
                    started="2026-11-25T10:00:00+00:00",
                    finished="2026-11-25T10:01:00+00:00",
                )
            )
        )
    assert len(catalogue.local.outbox("pending")) == 13
    icat.start_broker()
    report = catalogue.flush()
    assert report.error is None and len(report.delivered) == 13 and report.pending == []
    assert wait_for(lambda: all(_count(icat, f"burst-{i}") == 1 for i in range(20)))
    assert sorted(_count(icat, f"burst-{i}") for i in range(20)) == [1] * 20
    sent = {entry.message_id for entry in catalogue.local.outbox()}
    assert len(sent) == 20 and sent.isdisjoint(icat.duplicates())  # each sent once


def owe(catalogue: SQLiteCatalogue, record: ProcessedDataset, settings: IcatSettings) -> int:
    """Record ``record`` and owe it to ICAT, sending nothing (as a run whose broker was down)."""
    record_id = catalogue.register(record)
    assert catalogue.enqueue(record_id, DESTINATION, icat_payload(record, settings))
    return record_id


def test_a_sender_killed_before_the_receipt_leaves_no_duplicate_dataset(icat, icat_env):
    local = SQLiteCatalogue(icat_env)
    record_id = owe(local, a_record("k", "killed", "killed-1"), icat.settings())
    relay = SlowReceipts(icat.broker_port)  # the broker confirms; the relay holds it back
    environment = os.environ | {
        "CALYPSO_CATALOGUE__ICAT__METADATA_URLS": json.dumps([f"localhost:{relay.port}"]),
        "CALYPSO_CATALOGUE__ICAT__TIMEOUT_S": "2",
    }
    sender = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "catalogue", "flush"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The broker has the message and has confirmed it: the sender waits for the receipt.
        assert relay.held.wait(timeout=60)
        sender.send_signal(signal.SIGKILL)
        assert sender.wait(timeout=10) == -signal.SIGKILL
    finally:
        relay.close()
    [entry] = SQLiteCatalogue(icat_env).outbox()
    assert (entry.state, entry.attempts) == ("sending", 1)  # leased by the dead sender
    assert wait_for(lambda: _count(icat, "killed-1") == 1)  # ICAT has it: the copy will come
    catalogue = IcatCatalogue(local, icat.settings())
    report = catalogue.flush(release_stale=True)  # its lease still runs: nobody sends it
    assert (report.delivered, report.pending) == ([], [record_id])
    time.sleep(max(0.0, entry.lease_until - time.time()) + 0.2)
    report = catalogue.flush(release_stale=True)  # the lease ran out: sent again, once
    assert (report.delivered, report.pending, report.error) == ([record_id], [], None)
    [again] = SQLiteCatalogue(icat_env).outbox()
    assert (again.state, again.attempts, again.message_id) == ("delivered", 2, entry.message_id)
    assert wait_for(lambda: entry.message_id in icat.duplicates())  # the copy, recognised
    assert icat.duplicates().count(entry.message_id) == 1
    assert _count(icat, "killed-1") == 1


# What a flow run does at its end: register its dataset, which flushes what is owed.
FLOW_RUN_REGISTERS = """
import sys
from calypso.registry import ProcessedDataset, SQLiteCatalogue
from calypso.registry.icat import IcatCatalogue
from calypso.settings import IcatSettings

catalogue = IcatCatalogue(
    SQLiteCatalogue(sys.argv[1]), IcatSettings(metadata_urls=[sys.argv[2]], timeout_s=5)
)
catalogue.register(ProcessedDataset.model_validate_json(sys.argv[3]))
"""


def test_serve_and_a_flow_run_never_both_send_an_entry(icat, icat_env):
    from calypso.flows.online.serve import start_icat_flushing

    local = SQLiteCatalogue(icat_env)
    for index in range(6):
        owe(local, a_record("race", "race", f"race-{index}"), icat.settings())
    relay = SlowReceipts(icat.broker_port, delay_s=1.0)  # the flow run waits 1 s a receipt
    flow_run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FLOW_RUN_REGISTERS,
            str(icat_env),
            f"localhost:{relay.port}",
            a_record("race", "race", "race-6").model_dump_json(),
        ]
    )
    stop = threading.Event()
    try:
        assert relay.held.wait(timeout=60)  # the flow run is sending race-0, waiting
        # serve flushes (releasing stale entries) every 0.2 s meanwhile, straight to the broker
        start_icat_flushing(load_settings(serve={"icat_flush_interval_s": 0.2}), stop)
        assert flow_run.wait(timeout=60) == 0
        assert wait_for(lambda: local.outbox("owed") == [])
    finally:
        stop.set()
        relay.close()
        if flow_run.poll() is None:
            flow_run.kill()
    entries = local.outbox()
    assert len(entries) == 7 and {e.attempts for e in entries} == {1}  # each claimed once
    assert 0 < relay.receipts < 7  # both sent some: the flow run through the relay
    assert wait_for(lambda: all(_count(icat, f"race-{i}") == 1 for i in range(7)))
    assert {e.message_id for e in entries}.isdisjoint(icat.duplicates())  # none sent twice


def a_record(collection: str, sample: str, flow_run_id: str) -> ProcessedDataset:
    """A completed diffraction record of proposal ih0002 (no data behind it)."""
    session = "/data/visitor/ih0002/id00/20261125"
    dataset = f"{collection}/{collection}_0001"
    return ProcessedDataset(
        technique="diffraction",
        raw_dataset=f"{session}/RAW_DATA/{dataset}",
        processed_path=f"{session}/PROCESSED_DATA/{dataset}/diffraction",
        proposal="ih0002",
        beamline="id00",
        sample_name=sample,
        flow_run_id=flow_run_id,
    )


def test_a_retry_of_the_same_run_does_not_register_twice(icat, icat_env):
    catalogue = IcatCatalogue(SQLiteCatalogue(icat_env), icat.settings())
    record = a_record("r", "retry", "retry-1")
    first = catalogue.register(record)
    assert catalogue.register(record) == first
    rerun = catalogue.register(record.model_copy(update={"flow_run_id": "retry-2"}))
    assert rerun != first
    failed = catalogue.register(record.model_copy(update={"flow_run_id": "f", "status": "failed"}))
    assert [e.record_id for e in catalogue.local.outbox()] == [first, rerun]
    assert wait_for(lambda: _count(icat, "retry-1") == 1 and _count(icat, "retry-2") == 1)
    assert _count(icat, "f") == 0 and failed not in (first, rerun)


def test_serve_retries_pending_registrations_periodically(icat, icat_env):
    import threading

    from calypso.flows.online.serve import start_icat_flushing

    record = a_record("p", "periodic", "periodic-1")
    icat.stop_broker()
    try:
        catalogue = IcatCatalogue(SQLiteCatalogue(icat_env), icat.settings(timeout_s=1))
        catalogue.register(record)
        assert "waiting in the outbox" in catalogue.last_warning
    finally:
        icat.start_broker()
    stop = threading.Event()
    settings = load_settings(serve={"icat_flush_interval_s": 0.5})
    start_icat_flushing(settings, stop)  # what `calypso serve` runs beside its deployments
    try:
        assert wait_for(lambda: _count(icat, "periodic-1") == 1, timeout=30)
        assert SQLiteCatalogue(icat_env).outbox("pending") == []
    finally:
        stop.set()


def test_health_check_and_bad_configuration(
    icat, icat_env, monkeypatch, capsys, diffraction_sample
):
    assert main(["catalogue", "check"]) == 0
    out = capsys.readouterr().out
    assert "broker    ok" in out and "ingester  ok" in out and "icat+     ok" in out
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__METADATA_URLS", '["localhost:1"]')
    assert main(["catalogue", "check"]) == 5
    assert "localhost:1 cannot be reached" in capsys.readouterr().out
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__METADATA_URLS", "[]")
    assert main(["catalogue", "flush"]) == 2
    assert "CALYPSO_CATALOGUE__ICAT__METADATA_URLS" in capsys.readouterr().err


def test_icat_needs_a_sample_name(icat, icat_env, diffraction_sample, tmp_path, capsys):
    import shutil

    import h5py

    raw = diffraction_sample.dataset
    copy = tmp_path / "v" / raw.raw_dataset_dir.relative_to(raw.root)
    shutil.copytree(raw.raw_dataset_dir, copy)
    with h5py.File(copy / raw.raw_file.name, "a") as h5:
        del h5["1.1/sample/name"]
    poni = diffraction_sample.calibration["poni"]
    assert main(["run", "diffraction", str(copy), "--set", f"poni={poni}"]) == 3
    assert "no sample name (N.1/sample/name), which ICAT requires" in capsys.readouterr().err


def test_a_proposal_unknown_to_icat_is_refused_before_processing(
    icat, icat_env, diffraction_sample, tmp_path, capsys
):
    import shutil

    raw = diffraction_sample.dataset
    elsewhere = tmp_path / "v" / "ih0099" / raw.beamline / raw.session / "RAW_DATA" / "CeO2"
    shutil.copytree(raw.raw_dataset_dir, elsewhere / raw.name)
    poni = diffraction_sample.calibration["poni"]
    assert main(["run", "diffraction", str(elsewhere / raw.name), "--set", f"poni={poni}"]) == 5
    err = capsys.readouterr().err
    assert "proposal ih0099 has no investigation on id00 in ICAT" in err
    assert not (tmp_path / "v" / "ih0099" / raw.beamline / raw.session / "PROCESSED_DATA").exists()


def test_an_outbox_lease_keeps_other_senders_off_until_it_runs_out(tmp_path):
    local = SQLiteCatalogue(tmp_path / "catalogue.sqlite")
    record = a_record("l", "lease", "lease-1")
    owe(local, record, IcatSettings(metadata_urls=["localhost:1"]))
    entry = local.claim(DESTINATION, "a", lease_s=0.5)
    assert entry is not None and entry.lease_owner == "a" and entry.message_id
    assert local.claim(DESTINATION, "b", lease_s=60) is None  # a holds it
    assert local.release_stale(DESTINATION) == 0  # a live lease is left alone
    time.sleep(0.6)  # a died: its lease runs out
    taken = local.claim(DESTINATION, "b", lease_s=60)
    assert (taken.attempts, taken.message_id) == (2, entry.message_id)  # same message
    assert not local.renew(entry.id, "a", lease_s=60)  # a may no longer send it
    local.settle(entry.id, error="late", owner="a")  # nor give it back
    [held] = local.outbox()
    assert (held.state, held.lease_owner, held.last_error) == ("sending", "b", None)
    local.settle(entry.id)
    [done] = local.outbox()
    assert (done.state, done.lease_owner) == ("delivered", None)
    assert local.outbox("owed") == []


def test_an_outbox_of_schema_1_gets_leases_and_message_ids(tmp_path):
    import sqlite3

    path = tmp_path / "catalogue.sqlite"
    local = SQLiteCatalogue(path)
    owe(local, a_record("m", "migrated", "m-1"), IcatSettings(metadata_urls=["localhost:1"]))
    with sqlite3.connect(path) as db:  # back to schema 1: no lease, no message id
        for column in ("message_id", "lease_owner", "lease_until"):
            db.execute(f"ALTER TABLE outbox DROP COLUMN {column}")
        db.execute("UPDATE outbox SET state = 'sending'")  # left by an older Calypso
        db.execute("PRAGMA user_version = 1")
    local = SQLiteCatalogue(path)
    [entry] = local.outbox("owed")
    assert (entry.state, entry.message_id, entry.lease_until) == ("sending", None, None)
    claimed = local.claim(DESTINATION, "a", lease_s=60)  # no lease: its sender is gone
    assert claimed.message_id.startswith("calypso-") and claimed.attempts == 1
    assert local.outbox()[0].message_id == claimed.message_id  # kept for the next attempt
