"""Live runs started by the service at a scan's start (flows/online/scan_starts.py,
docs/live.md "Started by the service"): `calypso serve` and `calypso watch --blissdata` as
real processes, the session's Prefect server, and the acquisition simulator writing a scan
into the watched tree while it publishes it through blissdata on a real valkey server.

The live run starts while the scan runs, gives the offline result bit for bit, is
registered once under the key the scan's end would have, and the end of the scan starts
nothing more; two watchers (two states, as on two machines) give one run; a live run
killed mid-scan is processed again once, by the run the scan's end starts. Run with -s to
see the latencies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from calypso.flows.online.scan_starts import created_at
from calypso.flows.samples.diffraction import write_diffraction_sample
from calypso.tasks.raw.data_policy import RawDataset
from tests.live_servers import replayed
from tests.processes import start, wait_until
from tests.test_crash_safety import Plant, flow_run_process
from tests.test_live_flow import datasets

pytestmark = pytest.mark.slow
LIVE = "diffraction-live/diffraction-live"
TOMOGRAPHY_LIVE = "tomography-live/tomography-live"
SCAN_END = "saved-flow/at-scan-end"  # the saved flow a scan's end starts
STATES = ("one.sqlite", "two.sqlite")  # the two watchers' states
SERVE_POLL_S = 60  # far longer than a run may wait here: serve is told at once


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """`calypso serve` of diffraction and tomography (their live deployments too), short
    leases, polls for runs to start once a minute: each run here starts because the Prefect
    server's event stream told serve it was scheduled."""
    site = Plant(tmp_path_factory.mktemp("live-plant"), tomography=True, poll_s=SERVE_POLL_S)
    deployment = wait_until(lambda: live_deployment(site), 120, "the live deployment")
    tomography = wait_until(lambda: live_deployment(site, TOMOGRAPHY_LIVE), 120, "tomography's")
    # A run started before serve's fork server has imported everything waits for it.
    log = site.work / "serve.log"
    wait_until(lambda: "fork server for served runs is ready" in log.read_text(), 120, "forks")
    yield site
    site.close()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # leave the shared server clean
        client.delete_deployment(deployment.id)
        client.delete_deployment(tomography.id)


def live_deployment(plant: Plant, name: str = LIVE):
    from prefect.client.orchestration import get_client

    assert plant.serve.poll() is None, (plant.work / "serve.log").read_text()[-3000:]
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except Exception:
            return None


def live_runs(plant: Plant, raw: Path, name: str = LIVE) -> list:
    """The live flow runs of the dataset ``raw`` (deployment ``name``), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deployment = live_deployment(plant, name)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    return [r for r in runs if r.parameters.get("raw") == os.path.realpath(raw)]


@pytest.fixture(scope="module")
def bliss(plant, valkey_url):
    """The session's valkey server, emptied for blissdata, and two `calypso watch
    --blissdata` on the plant's tree following it, each with its own state file (as two
    services on two machines): the module's tests share them."""
    import redis
    from blissdata.redis_engine.store import DataStore

    redis.Redis.from_url(valkey_url).flushall()
    DataStore(valkey_url, init_db=True)._redis.connection_pool.disconnect()
    logs = []
    for state in STATES:
        env = plant.env | {"CALYPSO_WATCH__STATE_PATH": str(plant.home / state)}
        logs.append(plant.work / f"{state}.log")
        command = ["watch", str(plant.tree), "--blissdata", valkey_url]
        plant.watchers.append(start(command, env, logs[-1]))
    for log in logs:
        wait_until(
            lambda log=log: log.exists() and "following scan starts" in log.read_text(),
            120,
            "the watcher",
        )
    yield valkey_url
    plant.stop_watchers()


def simulate(
    recorded, plant: Plant, url: str | None, timeline: Path, rate: float
) -> subprocess.Popen:
    """The scan replayed into the watched tree, published through blissdata (``url``)."""
    command = [sys.executable, "-m", "calypso.flows.samples.acquisition_simulator"]
    return subprocess.Popen(
        [
            *(*command, str(recorded.raw_dataset_dir), str(plant.tree)),
            *("--rate", str(rate), "--frames-per-file", "2", "--timeline", str(timeline)),
            *(("--blissdata", url) if url else ()),
        ]
    )


def scan_created(url: str) -> float:
    """When the last scan was created on the blissdata server (epoch s)."""
    from blissdata.redis_engine.store import DataStore

    store = DataStore(url)
    try:
        return created_at(store.get_last_scan()[0])
    finally:
        store._redis.connection_pool.disconnect()


def state_of(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def phases(run, last_frame: float) -> str:
    """When the live run's tasks began and ended, in s after the last frame was written."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    spans = sorted(
        (t.start_time.timestamp() - last_frame, t.end_time.timestamp() - last_frame, t.name)
        for t in tasks
        if t.start_time and t.end_time
    )
    return "; ".join(f"{name.rsplit('-', 1)[0]} {a:+.2f}..{b:+.2f}" for a, b, name in spans)


def running_during_the_scan(plant: Plant, raw: Path, writer: subprocess.Popen, timeline: Path):
    """The scan's one live run once running, checked to have begun before the scan's last
    frame; with when it began and when the last frame was written (epoch s)."""
    wait_until(lambda: live_runs(plant, raw), 60, "the live run", 0.1)
    [run] = wait_until(lambda: [r for r in live_runs(plant, raw) if r.start_time], 60, "it", 0.05)
    running = run.start_time.timestamp()
    scan_running = writer.poll() is None
    assert writer.wait(timeout=60) == 0
    last_frame = json.loads(timeline.read_text())["written"][-1]
    assert scan_running and running < last_frame, (
        f"the live run began {running - last_frame:.2f} s after the scan's last frame "
        f"(Prefect made it {run.created.timestamp() - last_frame:.2f} s after)"
    )
    return run, running, last_frame


def test_a_scan_seen_being_written_starts_its_live_run_without_blissdata(plant, tmp_path):
    """`calypso watch` with `live_from_files` (no blissdata): the dataset file of a scan
    being written starts the live run following the growing files; at the scan's end the
    key is found processed live and nothing more is posted. (First in the module: the
    blissdata watchers of the tests below watch the same tree.)"""
    state = "files.sqlite"
    log = plant.work / f"{state}.log"
    env = plant.env | {
        "CALYPSO_WATCH__STATE_PATH": str(plant.home / state),
        "CALYPSO_WATCH__LIVE_FROM_FILES": "true",
    }
    plant.watchers.append(start(["watch", str(plant.tree)], env, log))
    try:
        wait_until(lambda: log.exists() and "watching" in log.read_text(), 120, "the watcher")
        recorded = write_diffraction_sample(tmp_path / "rec", frames=10, dataset_number=7, seed=7)
        raw = replayed(recorded, plant.tree)
        timeline = tmp_path / "written.json"
        began = time.time()
        writer = simulate(recorded, plant, None, timeline, rate=1)  # a 10 s scan
        run, running, _ = running_during_the_scan(plant, raw, writer, timeline)
        assert run.parameters["source"] == "files"
        print(f"\nscan begun -> live run (files) running: {running - began:.2f} s")
        [record] = wait_until(
            lambda: [r for r in plant.records(raw) if r.status == "completed"], 120, "the result"
        )
        assert record.flow_run_id == str(run.id) and record.key == run.parameters["trigger"]
        assert record.frames == 10
        wait_until(lambda: plant.announcements(raw, state) == [("confirmed", 1)], 60, "confirmed")
        assert [r for r in plant.runs(raw) if r.parameters.get("trigger")] == []
        assert len(live_runs(plant, raw)) == 1
        assert "processed live" in log.read_text()
    finally:
        plant.stop_watchers()


def test_a_scan_start_starts_one_live_run_and_the_scan_end_nothing_more(plant, bliss, tmp_path):
    recorded = write_diffraction_sample(tmp_path / "recorded", frames=10, dataset_number=5, seed=5)
    raw = replayed(recorded, plant.tree)
    timeline = tmp_path / "written.json"
    writer = simulate(recorded, plant, bliss, timeline, rate=1)  # a 10 s scan
    run, running, last_frame = running_during_the_scan(plant, raw, writer, timeline)
    made, created = run.created.timestamp(), scan_created(bliss)

    def registered():
        return [r for r in plant.records(raw) if r.status == "completed"]

    [record] = wait_until(registered, 120, "the live result registered", 0.05)
    registered_at = time.time()
    # The offline run of the same data, by hand (no key), beside it: compared below.
    from prefect.client.orchestration import get_client

    offline_dir = RawDataset.from_path(raw).session_dir / "PROCESSED_DATA" / "offline"
    with get_client(sync_client=True) as client:
        offline = client.create_flow_run_from_deployment(
            plant.deployment_id,
            parameters={
                "raw": str(raw),
                "parameters": run.parameters["parameters"],
                "scans": [1],
                "output_dir": str(offline_dir),
            },
        )
    wait_until(lambda: state_of(run.id).is_final(), 60, "the live run's end")
    assert state_of(run.id).is_completed(), state_of(run.id)
    print(f"\nscan created -> live flow run running: {running - created:.2f} s (the run ", end="")
    print(f"created by Prefect after {made - created:.2f} s)")
    print(f"last frame -> result registered: {registered_at - last_frame:.2f} s")
    print(f"the live run's tasks, from the last frame: {phases(run, last_frame)}")
    assert record.flow_run_id == str(run.id) and record.key == run.parameters["trigger"]
    assert record.frames == 10

    # The scan's end finds its key processed live: confirmed, nothing posted (each state).
    for state in STATES:
        wait_until(
            lambda s=state: plant.announcements(raw, s) == [("confirmed", 1)], 60, "confirmed"
        )
    time.sleep(3)  # more polls of both watchers after the scan's end
    triggered = [r for r in plant.runs(raw) if r.parameters.get("trigger")]
    assert triggered == [], "the end of the scan started a run"
    assert len(live_runs(plant, raw)) == 1, "two watchers started two live runs"
    assert len([r for r in plant.records(raw) if r.key]) == 1
    logs = "".join((plant.work / f"{state}.log").read_text() for state in STATES)
    assert "processed live" in logs and bliss.split("//")[1] in logs

    wait_until(lambda: state_of(offline.id).is_final(), 120, "the offline run")
    assert state_of(offline.id).is_completed()
    [offline_file] = offline_dir.glob("*.h5")
    live_file = record.outputs[0].split("::")[0]
    assert datasets(live_file) == datasets(str(offline_file))  # the same, bit for bit


def test_a_live_run_killed_mid_scan_is_processed_again_once_at_its_end(plant, bliss, tmp_path):
    recorded = write_diffraction_sample(tmp_path / "recorded", frames=12, dataset_number=6, seed=6)
    raw = replayed(recorded, plant.tree)
    timeline = tmp_path / "written.json"
    writer = simulate(recorded, plant, bliss, timeline, rate=2)
    [live] = wait_until(lambda: live_runs(plant, raw), 60, "the live run", 0.1)
    # Killed once it has claimed the scan and reserved its record (its first frames came).
    wait_until(
        lambda: any(r.flow_run_id == str(live.id) for r in plant.records(raw)),
        60,
        "the live run's claim",
        0.05,
    )
    process = wait_until(lambda: flow_run_process(plant.serve, live.id), 30, "its process")
    process.kill()  # SIGKILL: no state, no record, no finally
    scan_running = writer.poll() is None
    assert writer.wait(timeout=60) == 0

    [after] = wait_until(lambda: plant.settled(raw, 1), 180, "the end-of-scan run")
    last_frame = json.loads(timeline.read_text())["written"][-1]
    print(f"\nkilled {'during' if scan_running else 'after'} the scan; last frame -> the ", end="")
    print(f"end-of-scan run running: {after.start_time.timestamp() - last_frame:.2f} s")
    assert after.state.is_completed()
    wait_until(lambda: state_of(live.id).is_final(), 60, "the killed run's state")
    assert state_of(live.id).type.value == "CRASHED"
    assert len(live_runs(plant, raw)) == 1
    completed = [r for r in plant.records(raw) if r.status == "completed"]
    assert [r.flow_run_id for r in completed] == [str(after.id)]  # processed once
    assert completed[0].key == live.parameters["trigger"] and completed[0].frames == 12
    dead = next(r for r in plant.records(raw) if r.flow_run_id == str(live.id))
    assert dead.status == "failed" and "stopped before publishing" in dead.message
    # Posted twice: at the scan's start (live), then at its end (the live run crashed);
    # "emitted", or already "confirmed" by a watcher that saw the end-of-scan run finish
    # (after confirm_s: a loaded machine sees both watchers confirm).
    announced = {state: plant.announcements(raw, state) for state in STATES}
    twice = [[("emitted", 2)], [("confirmed", 2)]]
    assert any(seen in twice for seen in announced.values()), announced


def test_a_tomography_dataset_gets_one_live_run_from_its_first_scan(plant, bliss, tmp_path):
    """A rule taking whole datasets (tomography): the first scan's start (the darks)
    starts the dataset's one live run (its other scans share its key); it follows the
    projections and gives the result, registered once, before the dataset's end is seen."""
    from calypso.flows.samples.tomography import write_tomography_sample

    recorded = write_tomography_sample(
        tmp_path / "rec", rows=8, columns=96, projections=180, dataset_number=9
    )
    raw = replayed(recorded, plant.tree)
    command = [sys.executable, "-m", "calypso.flows.samples.acquisition_simulator"]
    began = time.time()
    writer = subprocess.Popen(
        [
            *(*command, str(recorded.raw_dataset_dir), str(plant.tree)),
            *("--scan", "1", "--scan", "2", "--scan", "3", "--scan", "4"),
            *("--rate", "60", "--frames-per-file", "50", "--gap", "1", "--blissdata", bliss),
        ]
    )
    [run] = wait_until(lambda: live_runs(plant, raw, TOMOGRAPHY_LIVE), 60, "the live run", 0.1)
    started = run.created.timestamp() - began
    assert writer.wait(timeout=60) == 0
    [record] = wait_until(
        lambda: [r for r in plant.records(raw) if r.status == "completed"], 120, "the result"
    )
    print(f"\nfirst scan begun -> tomography live run created: {started:.2f} s")
    assert record.flow_run_id == str(run.id) and record.key == run.parameters["trigger"]
    assert run.parameters["scans"] is None and len(live_runs(plant, raw, TOMOGRAPHY_LIVE)) == 1
    # The result is registered before the flow's call returns; Prefect marks it completed then.
    wait_until(lambda: state_of(run.id).is_final(), 60, "the live run's end")
    assert state_of(run.id).is_completed(), state_of(run.id)
    with h5py.File(record.outputs[0].split("::")[0]) as h5:
        assert "status" not in h5.attrs  # complete, not partial


def test_a_scan_end_on_blissdata_is_announced_at_once_not_at_the_next_poll(plant, bliss, tmp_path):
    """A scan reduced at its end (a saved flow's rule: not fed live) is announced when
    blissdata says the scan ended: the watcher looks at its dataset file then, not at its
    next poll (60 s here, inotify off: as on NFS or GPFS); the run its event triggers
    starts when the Prefect server tells serve it is scheduled, not at serve's next poll
    (60 s here too). Last in the module: the module's watchers are stopped, this one alone
    sees the scan."""
    import yaml

    from calypso.flows.specification import export_specification
    from calypso.registry.saved_flows import SavedFlows
    from tests.test_triggers import alice

    plant.stop_watchers()
    recorded = write_diffraction_sample(tmp_path / "rec", frames=7, dataset_number=8, seed=8)
    raw = replayed(recorded, plant.tree)
    scripts = raw.parents[2] / "SCRIPTS"  # the calibration where the session keeps it
    scripts.mkdir(parents=True, exist_ok=True)
    for path in recorded.calibration.values():
        shutil.copy(path, scripts / path.name)
    spec = yaml.safe_load(export_specification("diffraction"))
    spec["steps"]["plan"]["parameters"].update(
        poni=str(scripts / recorded.calibration["poni"].name),
        mask=str(scripts / recorded.calibration["mask"].name),
        npt=90,
    )
    SavedFlows(plant.home / "catalogue.sqlite").save(
        "at-scan-end", yaml.safe_dump(spec), "diffraction", alice(), "ih0001", ""
    )
    state, log = "ends.sqlite", plant.work / "ends.sqlite.log"
    # Only this scan matches: a 7-frame loopscan (the module's others have 10 or 12).
    rule = {"technique": "flow:at-scan-end", "detector": "pilatus*", "title": "loopscan 7 *"}
    env = plant.env | {
        "CALYPSO_WATCH__STATE_PATH": str(plant.home / state),
        "CALYPSO_WATCH__INTERVAL_S": "60",
        "CALYPSO_WATCH__INOTIFY": "false",
        "CALYPSO_WATCH__BEAMLINES": json.dumps({"id00": [rule]}),
    }
    plant.watchers.append(start(["watch", str(plant.tree), "--blissdata", bliss], env, log))
    try:
        # Serve deploys the saved flow, with its trigger, before the scan.
        wait_until(lambda: live_deployment(plant, SCAN_END), 120, "the saved flow's deployment")
        wait_until(lambda: log.exists() and "following scan starts" in log.read_text(), 120, "it")
        time.sleep(1)  # its first poll done: the next is 60 s away
        timeline = tmp_path / "written.json"
        writer = simulate(recorded, plant, bliss, timeline, rate=4)
        assert writer.wait(timeout=60) == 0
        last_frame = json.loads(timeline.read_text())["written"][-1]

        # Posted: the watcher claims the key first, then posts the event ("emitted").
        def posted():
            return [a for a in plant.announcements(raw, state) if a[0] != "claimed"]

        wait_until(posted, 30, "the event posted", 0.05)
        announced = time.time() - last_frame
        print(f"\nlast frame -> scan end's event posted (polls every 60 s): {announced:.2f} s")
        assert announced < 10, log.read_text()[-3000:]  # not the poll's 60 s
        assert plant.announcements(raw, state)[0][0] in ("emitted", "confirmed")

        # The saved flow's trigger starts its run on serve, which runs it to the end.
        def started():
            return [r for r in live_runs(plant, raw, SCAN_END) if r.start_time]

        [run] = wait_until(started, 60, "the saved flow's run started", 0.05)
        running = run.start_time.timestamp() - last_frame
        print(f"last frame -> its flow run running: {running:.2f} s")
        # Serve asks for runs to start every minute here: only being told can be this soon.
        assert running < 5, (plant.work / "serve.log").read_text()[-3000:]
        wait_until(lambda: state_of(run.id).is_final(), 120, "the saved flow's run ended")
        assert state_of(run.id).is_completed(), state_of(run.id)
    finally:
        plant.stop_watchers()


def test_which_scan_starts_start_a_live_run_and_of_what(tmp_path):
    """A scan rule: that scan. A dataset rule: the whole dataset, for a technique whose
    live run follows a dataset (tomography); for one that follows a single scan
    (diffraction), nothing: a live run of its first scan would claim the dataset's key."""
    from calypso.flows.online.acquisitions import started_acquisition
    from calypso.settings import WatchSettings

    dataset = tmp_path / "ih0001" / "id00" / "20261204" / "RAW_DATA" / "s" / "s_0001"
    dataset.mkdir(parents=True)
    (dataset / "s_0001.h5").touch()

    def started(*rules: dict):
        settings = WatchSettings(beamlines={"id00": list(rules)})
        found = started_acquisition(
            str(dataset / "s_0001.h5"), 2, "dark images", ("pco",), [tmp_path], settings
        )
        return found and (found.technique, found.scans)

    assert started({"technique": "diffraction", "detector": "pco"}) == ("diffraction", (2,))
    assert started({"technique": "diffraction", "detector": "pco", "unit": "dataset"}) is None
    tomography = {"technique": "tomography", "detector": "pco*", "unit": "dataset"}
    assert started(tomography) == ("tomography", None)
    assert started({"technique": "tomography", "detector": "eiger*", "unit": "dataset"}) is None
