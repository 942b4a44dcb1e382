"""Runs that died without a word (flows/dead_runs.py): a run killed with the process that
ran it (the portal, serve, a command) stayed Running in Prefect and in the portal, and its
catalogue record held its folder until another run of the same folder came. Once its
lease has run out, its record is released (a publication's files taken back, its part
folder removed) and its flow run is marked Crashed, by the portal and
serve every half lease and by ``calypso catalogue prune`` for its dataset; a run whose
lease still runs is left alone. Against the tests' real Prefect server."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running

from calypso.flows.cli import main
from calypso.flows.dead_runs import reap_dead_runs
from calypso.registry import ProcessedDataset, SQLiteCatalogue, claims
from calypso.settings import load_settings


@flow(name="calypso-test-killed-run", persist_result=False)
def killed_run() -> None:
    """Never run: its flow runs are made Running by hand, as one killed would be left."""


def running_flow_run() -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(killed_run, state=Running()).id)


def prefect_state(run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id)).state


def reserved(catalogue: SQLiteCatalogue, folder: Path, run_id: str, lease_s: float):
    """A run's claim and record, as FlowRun.planned makes them, and its part folder."""
    claims.claim(catalogue, f"key-{run_id}", run_id, "diffraction", lease_s)
    record = ProcessedDataset(
        technique="diffraction", raw_dataset=str(folder.parent / "RAW"),
        processed_path=str(folder), output_file=str(folder / "result.h5"),
        flow_run_id=run_id, status="running",
    )  # fmt: skip
    record = claims.reserve(catalogue, record, lease_s)
    (folder / f".calypso-partial-{run_id}" / "step-integrate").mkdir(parents=True)
    return record


@pytest.fixture(autouse=True)
def short_leases(monkeypatch):
    """Leases of 0.2 s: a record is released a lease past its own, 0.4 s after its run."""
    monkeypatch.setenv("CALYPSO_CATALOGUE__LEASE_S", "0.2")


def test_a_run_killed_silently_is_released_and_shown_crashed(tmp_path, catalogue_path):
    settings = load_settings()
    catalogue = SQLiteCatalogue(catalogue_path)
    dead, publishing, alive = running_flow_run(), running_flow_run(), running_flow_run()
    first = reserved(catalogue, tmp_path / "a", dead, 0.2)
    second = reserved(catalogue, tmp_path / "b", publishing, 0.2)
    third = reserved(catalogue, tmp_path / "c", alive, 600)
    # The second was killed with its results renamed into place, its record publishing.
    (tmp_path / "b" / "result.h5").write_bytes(b"b's result")
    sums = {"result.h5": hashlib.sha256(b"b's result").hexdigest()}
    claims.publishing(catalogue, second.id, publishing, f"key-{publishing}", 0.2, sums)
    time.sleep(0.5)

    # Within a lease of grace past its own, a run is not taken for dead (a loaded machine
    # may starve a live run's heartbeat).
    assert claims.release_dead(catalogue, grace_s=60) == []
    released = reap_dead_runs(settings)
    assert sorted(r.record_id for r in released) == [first.id, second.id]
    for record, run in ((first, dead), (second, publishing)):
        assert catalogue.get(record.id).status == "failed"
        assert not (Path(record.processed_path) / f".calypso-partial-{run}").exists()
        # Its claim stays a lease run out: the watcher posts the acquisition again.
        assert not claims.processing_claim(catalogue, f"key-{run}").live()
        state = prefect_state(run)
        assert state.type.value == "CRASHED" and "its lease ran out" in state.message
    assert "files it had published were removed" in catalogue.get(second.id).message
    assert not (tmp_path / "b" / "result.h5").exists()
    # The run whose lease still runs is left alone, and nothing is released twice.
    assert catalogue.get(third.id).status == "running"
    assert (tmp_path / "c" / f".calypso-partial-{alive}").exists()
    assert prefect_state(alive).type.value == "RUNNING"
    assert reap_dead_runs(settings) == []


def test_catalogue_prune_releases_a_dead_run_of_its_dataset(tmp_path, catalogue_path, capsys):
    """A rerun that came while the dead run's lease still ran went to the next version;
    the dead one's record stayed 'running' until a run of its folder came again."""
    catalogue = SQLiteCatalogue(catalogue_path)
    run = running_flow_run()
    record = reserved(catalogue, tmp_path / "out", run, 0.2)
    time.sleep(0.5)
    raw = str(tmp_path / "RAW")
    assert main(["catalogue", "prune", raw]) == 0
    assert f"would release id {record.id} of flow run {run}" in capsys.readouterr().out
    assert catalogue.get(record.id).status == "running"  # a dry run changes nothing
    assert prefect_state(run).type.value == "RUNNING"
    assert main(["catalogue", "prune", raw, "--yes"]) == 0
    assert f"released id {record.id} of flow run {run}" in capsys.readouterr().out
    assert catalogue.get(record.id).status == "failed"
    assert prefect_state(run).type.value == "CRASHED"


def test_the_portal_releases_dead_runs_as_it_starts(
    tmp_path, catalogue_path, monkeypatch, loopback
):
    """A portal killed with a run it launched: the run is shown Crashed, not Running, once
    a portal serves again (and then every half lease)."""
    import threading

    import uvicorn

    from calypso.flows.portal import create_app

    monkeypatch.setenv("CALYPSO_DATA_ROOTS", f'["{tmp_path}"]')
    catalogue = SQLiteCatalogue(catalogue_path)
    run = running_flow_run()
    reserved(catalogue, tmp_path / "out", run, 0.2)
    time.sleep(0.5)
    port = loopback.free_port()
    config = uvicorn.Config(create_app(load_settings()), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        loopback.wait_for_http(f"http://127.0.0.1:{port}/health", timeout=30)
        deadline = time.monotonic() + 20
        while prefect_state(run).type.value != "CRASHED" and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert prefect_state(run).type.value == "CRASHED"


def test_a_run_stopped_with_ctrl_c_says_so_in_its_record(tmp_path, catalogue_path):
    """Ctrl-C on `calypso run` left its record 'running': the next run went to `_v2`, a
    later one took the first folder back (a fresh-checkout walk)."""
    import os
    import signal
    import subprocess
    import sys

    from calypso.flows.samples.diffraction import write_diffraction_sample
    from tests.processes import wait_until

    # Long enough to be stopped mid-run on a loaded machine.
    sample = write_diffraction_sample(tmp_path / "visitor", frames=240, frames_per_file=40, seed=4)
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "diffraction",
        str(sample.raw_dataset_dir), "--set", f"poni={sample.calibration['poni']}",
        "--set", f"mask={sample.calibration['mask']}", "--set", "chunk_size=4",
    ]  # fmt: skip
    env = dict(os.environ, CALYPSO_CATALOGUE__LEASE_S="120")
    # Ctrl-C as at a terminal: pytest-xdist's workers ignore SIGINT, which their children
    # inherit (Python then installs no KeyboardInterrupt for it).
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    output = sample.dataset.processed_dataset_dir("diffraction")
    try:
        # Its part folder is there from its flow run's start to its end (a cold command
        # may have integrated most chunks before, while its Prefect server started).
        wait_until(lambda: list(output.glob(".calypso-partial-*")), 120, "the run", 0.02)
        assert run.poll() is None, "the run ended before it could be stopped"
    finally:
        run.send_signal(signal.SIGINT)
        _, errors = run.communicate(timeout=60)
    [record] = SQLiteCatalogue(catalogue_path).list()
    # Stopped mid-run, or as it published its results (its part folder is there until
    # they are in place), or as it ended: then the publication ends first, and the record
    # says completed (it stayed "running", the files renamed or not, in one run of the
    # full suite).
    if record.status == "completed":
        assert not list(output.glob(".calypso-partial-*")) and record.checksums, record
        return
    assert run.returncode != 0, errors
    assert record.status == "failed" and record.message.startswith("interrupted"), record


def test_a_ctrl_c_as_results_are_published_acts_once_they_are():
    """The results move into place with their record or not at all: a Ctrl-C meanwhile
    is held until the publication ends, then raised as Python raises it."""
    import os
    import signal
    import time

    from calypso.tasks.writers.publication import interrupts_held

    published = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist ignores it
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python acts on a signal between two instructions
            published.append("renamed and recorded")
        assert published == ["renamed and recorded"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
