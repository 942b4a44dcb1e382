"""Processing starts by itself: `calypso watch` and `calypso serve` as real processes.

The session's Prefect server (conftest) receives the watcher's events; its
automations start the deployments that `calypso serve` serves; the tests look
at flow runs, artifacts and the catalogue through the server's API and files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.online.acquisitions import Acquisition
from calypso.flows.online.watch import post_event
from calypso.flows.samples.diffraction import write_diffraction_sample
from calypso.flows.techniques import TECHNIQUES
from calypso.tasks.raw.data_policy import RawDataset
from tests.processes import start, stop, wait_until

pytestmark = pytest.mark.slow
CONCURRENCY = 3


class Facility:
    """A data tree, its rules, and `calypso serve` running against the test server."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.tree = work / "visitor"  # watched
        self.elsewhere = work / "inhouse"  # inside the data roots, not watched
        self.tree.mkdir()
        self.elsewhere.mkdir()
        calibration = write_diffraction_sample(work / "calibration", frames=1).calibration
        self.parameters = {
            "poni": str(calibration["poni"]),
            "mask": str(calibration["mask"]),
            "npt": 200,
        }
        self.home = work / "home"
        self.env = dict(os.environ)
        self.env.update(
            CALYPSO_HOME=str(self.home),
            CALYPSO_DATA_ROOTS=json.dumps([str(self.tree), str(self.elsewhere)]),
            # the beamline's calibration files: read by any run, outside the proposals
            CALYPSO_ACCESS__SHARED_PATHS=json.dumps([str(work / "calibration")]),
            CALYPSO_WATCH__BEAMLINES=json.dumps(
                {
                    "id00": [
                        {
                            "technique": "diffraction",
                            "detector": "pilatus*",
                            "parameters": self.parameters,
                        }
                    ],
                    "id02": [{"technique": "flow:auto-look", "detector": "pilatus*"}],
                }
            ),
            CALYPSO_WATCH__INTERVAL_S="1",
            CALYPSO_WATCH__QUIET_S="30",
            # an announcement that started no run is posted again after this long
            CALYPSO_WATCH__CONFIRM_S="120",
            CALYPSO_SERVE__DEFAULT_CONCURRENCY=str(CONCURRENCY),
            CALYPSO_SERVE__SAVED_FLOW_POLL_S="1",
            # a portal is announced: each results table links the run's pages there
            CALYPSO_PORTAL__PUBLIC_URL="https://portal.example.org",
            CALYPSO_EXECUTOR__N_WORKERS="2",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            # A task on a worker that dies fails at once (Dask would otherwise rerun it
            # elsewhere): the retry test kills a worker and retries the failed run.
            DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0",
        )
        self.env.pop("CALYPSO_CATALOGUE__PATH", None)
        self.serve = start(["serve", "--technique", "diffraction"], self.env, work / "serve.log")
        self.watchers: list[subprocess.Popen] = []
        self.deployment_id = wait_until(self._deployment_id, 180, "the diffraction deployment")

    def _deployment_id(self):
        from prefect.client.orchestration import get_client

        assert self.serve.poll() is None, (self.work / "serve.log").read_text()[-3000:]
        with get_client(sync_client=True) as client:
            try:
                deployment = client.read_deployment_by_name("diffraction/diffraction")
            except Exception:
                return None
        return deployment.id if deployment.version == TECHNIQUES["diffraction"].version else None

    def watch(self) -> subprocess.Popen:
        watcher = start(["watch", str(self.tree)], self.env, self.work / "watch.log")
        self.watchers.append(watcher)
        return watcher

    def runs(self) -> list:
        """Flow runs of the deployment, oldest first."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[self.deployment_id])
                ),
                sort=FlowRunSort.START_TIME_ASC,
                limit=200,
            )

    def finished(self, count: int):
        """The runs once ``count`` of them are final and none is pending."""
        runs = self.runs()
        final = [r for r in runs if r.state and r.state.is_final()]
        return runs if len(final) >= count and len(final) == len(runs) else None

    def records(self) -> list[tuple]:
        path = self.home / "catalogue.sqlite"
        if not path.exists():
            return []
        with sqlite3.connect(path) as db:
            return db.execute(
                "SELECT raw_dataset, status, flow_run_id, parameters FROM processed_datasets "
                "ORDER BY id"
            ).fetchall()

    def close(self) -> None:
        for process in [*self.watchers, self.serve]:
            stop(process)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        with get_client(sync_client=True) as client:  # leave the shared server clean
            client.delete_deployment(self.deployment_id)
            for deployment in client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["saved-flow"]))
            ):
                client.delete_deployment(deployment.id)

    def deployment(self, name: str):
        """The deployment ``name`` once serve has it (saved flows: within a poll)."""
        from prefect.client.orchestration import get_client

        def found():
            assert self.serve.poll() is None, (self.work / "serve.log").read_text()[-3000:]
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name(name)
                except Exception:
                    return None

        return wait_until(found, 60, f"the deployment {name}")


def alice():
    """A user signed in (as through the portal) with her proposals: saved flows are hers."""
    from calypso.registry.access import Identity

    return Identity("alice", "ldap", proposals={"ih0001", "ih0004"})


def first_sample(facility: Facility) -> Path:
    """The dataset the first test wrote into the watched tree (its session is the day the
    sample was written)."""
    [found] = facility.tree.glob("ih0001/id00/*/RAW_DATA/CeO2/CeO2_0001")
    return found


@pytest.fixture(scope="module")
def facility(tmp_path_factory):
    site = Facility(tmp_path_factory.mktemp("facility"))
    yield site
    site.close()


def event_for(raw_dir: Path, parameters: dict, version: str | None = None) -> dict:
    raw = RawDataset.from_path(raw_dir)
    acquisition = Acquisition(
        raw_dataset_dir=str(raw_dir),
        technique="diffraction",
        scans=(1,),
        parameters=parameters,
        beamline=raw.beamline,
        proposal=raw.proposal,
    )
    return acquisition.event(version or TECHNIQUES["diffraction"].version)


def test_a_dataset_written_into_the_watched_tree_is_processed(facility):
    from prefect.client.orchestration import get_client

    facility.watch()
    sample = write_diffraction_sample(facility.tree, frames=3, frames_per_file=2)
    [run] = wait_until(lambda: facility.finished(1), 240, "the triggered flow run")
    assert run.state.is_completed(), run.state
    ended = sample.dataset.raw_file.stat().st_mtime  # end_time, written last
    print(f"scan end -> flow run started: {run.start_time.timestamp() - ended:.2f} s")
    # forked from serve's fork server, not a fresh interpreter (flows/online/warm_starts.py)
    assert "served runs start warm" in (facility.work / "serve.log").read_text()
    assert run.parameters["raw"] == str(sample.raw_dataset_dir)
    assert run.parameters["parameters"]["npt"] == 200 and run.parameters["scans"] == [1]
    processed = sample.dataset.processed_dataset_dir("diffraction") / "CeO2_0001.h5"
    with h5py.File(processed, "r") as h5:
        assert h5["1.1/pilatus1m_integrate/integrated/intensity"].shape == (3, 200)
    [record] = facility.records()
    assert record[:3] == (str(sample.raw_dataset_dir), "completed", str(run.id))
    # What the UI shows for the run: the results table and the quick look (its one chunk
    # has no progress bar: tests/test_diffraction_flow.py has a run of several).
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    kinds = {a.type: a for a in artifacts}
    assert {"table", "markdown"} <= set(kinds) and "progress" not in kinds
    table = kinds["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    items = {row["item"]: row["value"] for row in rows}
    assert items["catalogue_id"] == 1 and items["output"].startswith(str(processed))
    portal = "https://portal.example.org"
    assert items["this run in the portal"] == f"{portal}/runs/{run.id}"
    assert items["its results in the portal"].startswith(f"{portal}/folder/ih0001/id00/")
    assert "data:image/png;base64" in kinds["markdown"].data


def test_the_prefect_ui_shows_the_results_table_of_a_finished_run(
    facility, chromium, test_artifacts
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    run = next(r for r in facility.runs() if r.state.is_completed())
    with get_client(sync_client=True) as client:
        [table] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
                type=ArtifactFilterType(any_=["table"]),
            )
        )
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    chromium.sign_in(ui, os.environ["PREFECT_API_AUTH_STRING"])  # the UI is closed too
    page = f"{ui}/artifacts/artifact/{table.id}"
    text = re.sub(r"<[^>]+>", " ", chromium(page, "--dump-dom"))
    assert "calypso-diffraction-results" in text and run.name in text
    assert "catalogue_id" in text and "PROCESSED_DATA" in text and "frames per s" in text
    shot = test_artifacts / "prefect-ui-results-table.png"
    shot.unlink(missing_ok=True)
    chromium(page, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    run_page = test_artifacts / "prefect-ui-flow-run.png"
    chromium(f"{ui}/runs/flow-run/{run.id}", f"--screenshot={run_page}")
    assert run_page.stat().st_size > 20_000


def test_the_same_event_twice_gives_one_run_and_new_parameters_process_again(facility):
    sample = write_diffraction_sample(facility.elsewhere, frames=2, seed=3)
    before = len(facility.runs())
    event = event_for(sample.raw_dataset_dir, facility.parameters)
    api = os.environ["PREFECT_API_URL"]
    post_event(api, event)
    post_event(api, event)
    runs = wait_until(lambda: facility.finished(before + 1), 180, "one run")
    time.sleep(5)  # a second run would have been created by now
    assert len(facility.runs()) == before + 1 and runs[-1].state.is_completed()

    # The same work announced under another event id (a watcher elsewhere, long after):
    # the run starts, finds the work done, and does nothing.
    post_event(api, event | {"id": str(uuid.uuid4())})
    runs = wait_until(lambda: facility.finished(before + 2), 180, "the duplicate run")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        result = client.read_flow_run(runs[-1].id)
    assert result.state.is_completed()
    raw_records = [r for r in facility.records() if r[0] == str(sample.raw_dataset_dir)]
    assert len(raw_records) == 1

    # Changed parameters, or a new flow version, process again.
    post_event(api, event_for(sample.raw_dataset_dir, facility.parameters | {"npt": 150}))
    post_event(api, event_for(sample.raw_dataset_dir, facility.parameters, version="0.0.0+new"))
    wait_until(lambda: facility.finished(before + 4), 180, "two more runs")
    raw_records = [r for r in facility.records() if r[0] == str(sample.raw_dataset_dir)]
    assert sorted(json.loads(r[3])["npt"] for r in raw_records) == [150, 200, 200]


def test_a_restarted_or_second_watcher_announces_nothing_twice(facility):
    before = len(facility.runs())
    for watcher in facility.watchers:
        stop(watcher)
    facility.watchers.clear()
    facility.watch()
    facility.watch()  # two watchers on the same tree
    sample = write_diffraction_sample(facility.tree, frames=2, dataset_number=2, seed=4)
    runs = wait_until(lambda: facility.finished(before + 1), 240, "the new dataset's run")
    time.sleep(6)  # several polls of both watchers
    runs = facility.runs()
    assert len(runs) == before + 1
    assert runs[-1].parameters["raw"] == str(sample.raw_dataset_dir)


def test_nine_datasets_at_once_each_processed_once_within_the_limit(facility, tmp_path):
    # Three times the limit of CONCURRENCY runs at once: the limit is tested, in waves.
    count = 3 * CONCURRENCY
    before = len(facility.runs())
    template = first_sample(facility)
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"CeO2_{n:04d}" for n in range(101, 101 + count)]
    for name in names:
        shutil.copytree(template, staging / name)
        (staging / name / "CeO2_0001.h5").rename(staging / name / f"{name}.h5")
    collection = facility.tree / "ih0002" / "id00" / "20261127" / "RAW_DATA" / "CeO2"
    collection.mkdir(parents=True)
    for name in names:  # each dataset appears complete, all within a second
        (staging / name).rename(collection / name)
    runs = wait_until(lambda: facility.finished(before + count), 600, "the runs", interval=2)
    new = runs[before:]
    assert all(r.state.is_completed() for r in new), [r.state.name for r in new]
    assert sorted(Path(r.parameters["raw"]).name for r in new) == names
    # Never more than the deployment's limit at once.
    spans = sorted((r.start_time, r.end_time) for r in new)
    overlaps = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlaps <= CONCURRENCY, overlaps
    processed = [r for r in facility.records() if "/ih0002/" in r[0]]
    assert len(processed) == count and len({r[0] for r in processed}) == count
    output = collection.parent.parent / "PROCESSED_DATA" / "CeO2" / names[-1] / "diffraction"
    with h5py.File(output / f"{names[-1]}.h5", "r") as h5:
        assert np.isfinite(h5["1.1/pilatus1m_integrate/integrated/intensity"][()]).all()


def test_an_event_the_server_lost_is_posted_again(facility, tmp_path):
    """At-least-once delivery: the watcher checks that each announcement started a run."""
    from calypso.flows.online.watch import Watcher
    from calypso.settings import load_settings

    before = len(facility.runs())
    sample = write_diffraction_sample(facility.elsewhere, frames=1, dataset_number=11, seed=11)
    settings = load_settings(
        data_roots=[facility.tree, facility.elsewhere],
        home=facility.home / "lost",
        watch={"confirm_s": 0.1, "beamlines": {"id00": [{"technique": "diffraction"}]}},
    )
    watcher = Watcher([facility.elsewhere], settings, os.environ["PREFECT_API_URL"])
    event = event_for(sample.raw_dataset_dir, facility.parameters)
    key = event["payload"]["key"]
    # As if posted, then lost on the way: claimed and recorded, but never received.
    acquisition = Acquisition(
        raw_dataset_dir=str(sample.raw_dataset_dir),
        technique="diffraction",
        scans=(1,),
        parameters=facility.parameters,
        beamline="id00",
        proposal="ih0001",
    )
    assert watcher.state.claim(acquisition, key, "v", event["id"])
    watcher.state.settle(key, emitted=True, event=event)
    time.sleep(0.2)
    watcher.confirm()  # no run has this key: posted again, under a new id
    runs = wait_until(lambda: facility.finished(before + 1), 180, "the run of the re-posted event")
    assert runs[-1].parameters["trigger"] == key and runs[-1].state.is_completed()
    time.sleep(0.2)
    watcher.confirm()  # now confirmed: nothing posted again
    time.sleep(5)
    assert len(facility.runs()) == before + 1


def test_bad_events_are_rejected_with_a_reason_and_the_watcher_goes_on(facility, tmp_path):
    api = os.environ["PREFECT_API_URL"]
    before = len(facility.runs())
    # A path outside the configured roots: the run refuses it, reading nothing.
    outside = write_diffraction_sample(tmp_path / "outside", frames=1)
    post_event(api, event_for(outside.raw_dataset_dir, facility.parameters))
    runs = wait_until(lambda: facility.finished(before + 1), 180, "the refused run")
    assert runs[-1].parameters["raw"] == str(outside.raw_dataset_dir)
    assert runs[-1].state.is_failed()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def reason_logged() -> bool:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[-1].id]))
            )
        return any("outside the configured data roots" in log.message for log in logs)

    # Run logs reach the server in batches, after the run's final state: wait for them.
    wait_until(reason_logged, 60, "the refusal's reason in the run's logs")
    assert not outside.dataset.processed_dataset_dir("diffraction").exists()

    sample = write_diffraction_sample(facility.tree, frames=2, dataset_number=3, seed=5)
    runs = wait_until(lambda: facility.finished(before + 2), 240, "the next dataset's run")
    assert runs[-1].parameters["raw"] == str(sample.raw_dataset_dir)
    assert all(w.poll() is None for w in facility.watchers)


def dask_workers(serve: subprocess.Popen) -> list:
    import psutil

    return [
        child
        for child in psutil.Process(serve.pid).children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    ]


def chunk_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="integrate_chunk")),
            limit=200,
        )


def test_a_retry_after_a_killed_worker_recomputes_only_unfinished_chunks(facility, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    # 30 chunks of 2 frames: the kill, once 4 are written, lands while others still run
    # even on a loaded machine (15 chunks were all done before it once, on CI).
    sample = write_diffraction_sample(facility.elsewhere, frames=60, dataset_number=7, seed=6)
    chunks = 30
    parameters = {
        "raw": str(sample.raw_dataset_dir),
        "parameters": facility.parameters | {"chunk_size": 2},
    }
    # Outputs stay inside the dataset's proposal (a served run is confined to it).
    results = sample.dataset.session_dir / "PROCESSED_DATA"

    def start_run(output: Path):
        with get_client(sync_client=True) as client:
            return client.create_flow_run_from_deployment(
                facility.deployment_id, parameters=parameters | {"output_dir": str(output)}
            )

    def state_of(run):
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id).state

    reference = start_run(results / "a")
    wait_until(lambda: state_of(reference).is_final(), 240, "the uninterrupted run")
    assert state_of(reference).is_completed()
    interrupted = start_run(results / "b")
    parts = results / "b" / f".calypso-partial-{interrupted.id}"
    wait_until(
        lambda: parts.is_dir() and len(list(parts.glob("step-*/*.h5"))) >= 4,
        240,
        "some chunks",
        interval=0.01,
    )
    for worker in dask_workers(facility.serve)[:1]:
        worker.kill()
    wait_until(lambda: state_of(interrupted).is_final(), 120, "the run to fail")
    assert state_of(interrupted).is_failed()

    # Task-run states reach the server as events, recorded asynchronously, and a chunk
    # already running on the surviving worker may still finish: count once the tally is
    # steady.
    def steady_count() -> int | None:
        counts = []
        for _ in range(3):
            runs = chunk_runs(interrupted.id)
            counts.append(sum(1 for r in runs if r.state and r.state.is_completed()))
            time.sleep(2)
        return counts[0] if len(set(counts)) == 1 else None

    done_first = wait_until(steady_count, 90, "the chunk states to settle", interval=0)
    assert 0 < done_first < chunks

    with get_client(sync_client=True) as client:  # what the UI's Retry does
        client.set_flow_run_state(interrupted.id, Scheduled(name="AwaitingRetry"), force=True)
    wait_until(lambda: state_of(interrupted).is_final(), 240, "the retried run")
    assert state_of(interrupted).is_completed()

    def retried_chunks() -> list | None:
        runs = [r for r in chunk_runs(interrupted.id) if r.flow_run_run_count == 2]
        final = len(runs) == chunks and all(r.state and r.state.is_final() for r in runs)
        return runs if final else None

    retried = wait_until(retried_chunks, 60, "the retried chunks' final states")
    cached = [r for r in retried if r.state.name == "Cached"]
    computed = [r for r in retried if r.state.name == "Completed"]
    print(f"chunks: {done_first} done before the kill; retry: {len(cached)} cached, ", end="")
    print(f"{len(computed)} computed")
    # Every chunk that had finished is taken from the cache and all others run again,
    # once. The one chunk in flight on the killed worker (one thread a worker) may have
    # died between persisting its result and reporting its state, or the other way
    # round: it counts on either side.
    assert len(retried) == chunks and len(computed) == chunks - len(cached)
    assert done_first - 1 <= len(cached) <= done_first + 1

    def intensities(folder: Path) -> np.ndarray:
        [nexus] = folder.glob("*.h5")
        with h5py.File(nexus, "r") as h5:
            return h5["1.1/pilatus1m_integrate/integrated/intensity"][()]

    np.testing.assert_array_equal(intensities(results / "a"), intensities(results / "b"))
    assert not parts.exists()  # the part folder goes once the run completes


def test_a_saved_user_flow_runs_from_its_deployment(facility):
    import yaml
    from prefect.client.orchestration import get_client

    from calypso.flows.specification import export_specification
    from calypso.registry.saved_flows import SavedFlows

    sample = write_diffraction_sample(facility.elsewhere, frames=2, dataset_number=8, seed=8)
    spec = yaml.safe_load(export_specification("diffraction"))
    spec["steps"]["plan"]["parameters"].update(
        poni=str(sample.calibration["poni"]), mask=str(sample.calibration["mask"]), npt=120
    )
    SavedFlows(facility.home / "catalogue.sqlite").save(
        "quick-look", yaml.safe_dump(spec), "diffraction", alice(), "ih0001", ""
    )
    # Saved while serve runs: its own deployment appears, the flow's name in its form.
    deployment = facility.deployment("saved-flow/quick-look")
    assert deployment.parameters == {"name": "quick-look"}
    assert deployment.version.startswith("quick-look@1 ")
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"raw": str(sample.raw_dataset_dir)}
        )

    def state():
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id).state

    wait_until(lambda: state().is_final(), 240, "the saved flow's run")
    assert state().is_completed(), state()
    output = sample.dataset.processed_dataset_dir(None) / "diffraction_quick-look_v1"
    [nexus] = output.glob("*.h5")
    with h5py.File(nexus, "r") as h5:
        assert h5["1.1/pilatus1m_integrate/integrated/intensity"].shape == (2, 120)
        provenance = json.loads(h5["1.1/pilatus1m_integrate/provenance/data"][()])
    assert provenance["user_flow"]["name"] == "quick-look"

    # A new version updates the deployment; deleting the flow pauses it.
    saved_flows = SavedFlows(facility.home / "catalogue.sqlite")
    saved_flows.save("quick-look", yaml.safe_dump(spec), "diffraction", alice(), "ih0001", "v2")
    wait_until(
        lambda: facility.deployment("saved-flow/quick-look").version.startswith("quick-look@2 "),
        60,
        "the deployment of version 2",
    )
    saved_flows.delete("quick-look", alice())
    wait_until(lambda: facility.deployment("saved-flow/quick-look").paused, 60, "the pause")
    # Any saved flow by name: the `saved-flow` deployment.
    assert facility.deployment("saved-flow/saved-flow").parameters == {}


def test_a_beamline_rule_runs_a_saved_flow_after_each_acquisition(facility, tmp_path):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter

    from calypso.flows.specification import export_specification
    from calypso.registry.saved_flows import SavedFlows

    if not facility.watchers:
        facility.watch()
    # A dataset of beamline id02, whose rule is `technique = "flow:auto-look"`.
    source = write_diffraction_sample(tmp_path / "v", frames=2, dataset_number=9, seed=9)
    session = facility.tree / "ih0004" / "id02" / "20261127"
    calibration = session / "SCRIPTS"
    calibration.mkdir(parents=True)
    for path in source.calibration.values():
        shutil.copy(path, calibration / path.name)
    spec = yaml.safe_load(export_specification("diffraction"))
    spec["steps"]["plan"]["parameters"].update(
        poni=str(calibration / source.calibration["poni"].name),
        mask=str(calibration / source.calibration["mask"].name),
        npt=90,
    )
    SavedFlows(facility.home / "catalogue.sqlite").save(
        "auto-look", yaml.safe_dump(spec), "diffraction", alice(), "ih0004", ""
    )
    deployment = facility.deployment("saved-flow/auto-look")

    def runs() -> list:
        from prefect.client.schemas.filters import DeploymentFilterId

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )

    staging = tmp_path / "staging" / "CeO2_0009"
    shutil.copytree(source.raw_dataset_dir, staging)
    (session / "RAW_DATA" / "CeO2").mkdir(parents=True)
    staging.rename(session / "RAW_DATA" / "CeO2" / "CeO2_0009")
    [done] = wait_until(
        lambda: [
            r for r in runs() if r.parameters.get("name") == "auto-look" and r.state.is_final()
        ],
        240,
        "the saved flow run started by the acquisition",
    )
    assert done.state.is_completed(), done.state
    assert done.parameters["raw"].endswith("/ih0004/id02/20261127/RAW_DATA/CeO2/CeO2_0009")
    output = session / "PROCESSED_DATA" / "CeO2" / "CeO2_0009" / "diffraction_auto-look_v1"
    with h5py.File(output / "CeO2_0009.h5", "r") as h5:
        assert h5["1.1/pilatus1m_integrate/integrated/intensity"].shape == (2, 90)
