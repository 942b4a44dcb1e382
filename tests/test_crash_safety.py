"""Nothing lost, nothing processed twice, no result without its record (issue #22, items 1
and 4): claims are leases held by live flow runs, the watcher's announcements an outbox,
paths canonical; results are published with their record, in versions beside older ones.

The first tests are in-process (the claims, the publication, the watcher's verdicts); the
others run the real thing: `calypso serve` and `calypso watch` as processes against the
session's Prefect server, killed with SIGKILL where the issue measured losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import h5py
import pytest

from calypso.errors import CatalogueError
from calypso.flows.online.acquisitions import Acquisition, processing_key
from calypso.flows.online.watch import verdict
from calypso.registry import ProcessedDataset, SQLiteCatalogue, claims
from calypso.registry.claims import Claim
from calypso.registry.heartbeat import Heartbeat
from calypso.registry.watch_state import WatchState
from calypso.tasks.writers.nexus import atomic_outputs
from calypso.tasks.writers.publication import preparing
from tests.processes import start, stop, wait_until


def reservation(folder: Path, run: str, output: str = "result.h5") -> ProcessedDataset:
    return ProcessedDataset(
        technique="diffraction",
        raw_dataset="/raw/d",
        processed_path=str(folder),
        output_file=str(folder / output),
        flow_run_id=run,
        status="running",
    )


def test_a_claim_is_a_lease_that_a_dead_holder_loses(tmp_path):
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    assert claims.claim(catalogue, "k", "a", "diffraction", 0.3) == (True, None)
    taken, holder = claims.claim(catalogue, "k", "b", "diffraction", 0.3)
    assert not taken and holder.flow_run_id == "a" and holder.live()  # alive: b skips
    # The Prefect API says a is over (crashed): b may take it at once.
    taken, before = claims.claim(catalogue, "k", "b", "diffraction", 0.3, take_from="a")
    assert taken and before.flow_run_id == "a"
    # b is killed: no heartbeat; once its lease ran out, c takes over, exactly one of two.
    time.sleep(0.35)
    results = [claims.claim(catalogue, "k", run, "diffraction", 5)[0] for run in ("c", "d")]
    assert results == [True, False]
    assert catalogue.claim_processing("k", "e", "diffraction") == "c"


def test_a_heartbeat_keeps_the_lease_and_a_completed_record_marks_it_done(tmp_path):
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    claims.claim(catalogue, "k", "a", "diffraction", 0.4)
    record = claims.reserve(catalogue, reservation(tmp_path / "out", "a"), 0.4)
    heartbeat = Heartbeat(catalogue, "a", "k", record.id, 0.4).start()
    time.sleep(1.0)  # more than twice the lease: alive only through the heartbeat
    assert heartbeat.beats >= 4 and not heartbeat.lost
    assert not claims.claim(catalogue, "k", "b", "diffraction", 1)[0]
    heartbeat.stop()
    claims.publishing(catalogue, record.id, "a", "k", 1, {"result.h5": "0" * 64})
    done = record.model_copy(update={"status": "completed", "key": "k"})
    catalogue.register(done)
    assert catalogue.get(record.id).status == "completed"
    claim = claims.processing_claim(catalogue, "k")
    assert (claim.state, claim.record_id) == ("done", record.id)
    taken, holder = claims.claim(catalogue, "k", "b", "diffraction", 1)
    assert not taken and holder.state == "done"  # processed: a duplicate does nothing


def test_a_run_that_lost_its_claim_cannot_publish(tmp_path):
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    claims.claim(catalogue, "k", "a", "diffraction", 0.1)
    record = claims.reserve(catalogue, reservation(tmp_path / "out", "a"), 0.1)
    time.sleep(0.15)  # a was thought dead: b took over
    assert claims.claim(catalogue, "k", "b", "diffraction", 5)[0]
    with pytest.raises(CatalogueError, match="lost its claim on this acquisition to flow run b"):
        claims.publishing(catalogue, record.id, "a", "k", 1, {})


def test_a_record_completes_with_its_outbox_entry_or_not_at_all(tmp_path):
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    claims.claim(catalogue, "k", "a", "diffraction", 0.1)
    kept = claims.reserve(catalogue, reservation(tmp_path / "out", "a"), 5)
    time.sleep(0.15)
    claims.claim(catalogue, "k", "b", "diffraction", 5)  # a's claim lost: a must not complete
    lost = kept.model_copy(update={"status": "completed", "key": "k"})
    with pytest.raises(CatalogueError, match="lost its claim"):
        catalogue.register(lost, owed=[("icat", {"path": "/out"})])
    assert catalogue.outbox() == [] and catalogue.get(kept.id).status == "running"
    mine = claims.reserve(catalogue, reservation(tmp_path / "other", "b"), 5)
    done = mine.model_copy(update={"status": "completed", "key": "k"})
    assert catalogue.register(done, owed=[("icat", {"path": "/other"})]) == mine.id
    [entry] = catalogue.outbox()
    assert (entry.record_id, entry.key, entry.payload) == (
        mine.id,
        f"icat:{mine.id}",
        {"path": "/other"},
    )
    assert claims.processing_claim(catalogue, "k").state == "done"


def test_versions_go_beside_and_a_dead_reservation_frees_its_folder(tmp_path):
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    out = tmp_path / "diffraction"
    first = claims.reserve(catalogue, reservation(out, "a"), 5)
    assert (first.version, first.processed_path) == (1, str(out))
    second = claims.reserve(catalogue, reservation(out, "b"), 5)  # a is alive: beside it
    assert (second.version, second.processed_path) == (2, f"{out}_v2")
    # A retry of b (same flow run) takes back its own folder.
    assert claims.reserve(catalogue, reservation(out, "b"), 5).id == second.id
    # Another result file in the same folder (a tomography preview) is no rerun.
    preview = claims.reserve(catalogue, reservation(out, "p", "result_preview.h5"), 5)
    assert preview.version == 1
    # b completes; a dies (lease runs out): the next run gets a's folder, a is failed.
    catalogue.register(second.model_copy(update={"status": "completed"}))
    catalogue.register(preview.model_copy(update={"status": "completed"}))
    claims.reserve(catalogue, reservation(out, "x"), 5)  # v3, alive
    time.sleep(0.01)
    with catalogue._connect() as db:
        db.execute("UPDATE processed_datasets SET lease_expires = 0 WHERE id = ?", (first.id,))
    again = claims.reserve(catalogue, reservation(out, "c"), 5)
    assert again.version == 1
    assert catalogue.get(first.id).status == "failed"
    assert "stopped before publishing" in catalogue.get(first.id).message


def test_files_no_record_holds_are_never_overwritten(tmp_path):
    """Results of another catalogue (another account's home, a catalogue started afresh),
    a user's own files in an --output folder, another program's: a run replaced them
    without a word, as its catalogue held no record of that folder."""
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    out = tmp_path / "diffraction"
    out.mkdir()
    (out / "result.h5").write_text("another home's result")
    assert claims.reserve(catalogue, reservation(out, "a"), 5).version == 2
    mine = tmp_path / "userdir"
    mine.mkdir()
    (mine / "result.png").write_text("the user's own plot")  # a sibling of the result
    assert claims.reserve(catalogue, reservation(mine, "b"), 5).version == 2
    # Another result file of the same folder is no collision; nor a run's own leftovers:
    # a dead run's part folder, a live run's partial file (taken over by the next run).
    assert claims.reserve(catalogue, reservation(out, "c", "preview.h5"), 5).version == 1
    left = tmp_path / "left"
    (left / ".calypso-partial-dead").mkdir(parents=True)
    (left / "result.partial.h5").write_text("a live run's frames so far")
    assert claims.reserve(catalogue, reservation(left, "d"), 5).version == 1
    # The result unknown: anything there is in the way.
    unknown = reservation(tmp_path / "userdir", "e").model_copy(update={"output_file": None})
    assert claims.reserve(catalogue, unknown, 5).version == 3


@pytest.mark.parametrize("renamed", ["every file", "the first file"])
def test_a_run_killed_while_publishing_is_taken_back_and_published_once(tmp_path, renamed):
    """A run killed after renaming its results into place (all, or the first), before its
    record completed: its record stayed 'publishing' for good and held its folder, so the
    acquisition was processed again into a second version (a sweep saw two complete
    results, one with no record). The next run for the key removes the files that still
    have their recorded checksums (the dead run's own) and its part folder, and takes
    the folder: published once. A file changed since is nobody's to remove."""
    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    out = tmp_path / "diffraction"
    assert claims.claim(catalogue, "K", "a", "diffraction", 5)[0]
    dead = claims.reserve(catalogue, reservation(out, "a"), 5)
    part = out / ".calypso-partial-a" / "results"
    part.mkdir(parents=True)
    files = {"result.h5": b"a's result", "result.png": b"a's look", "result.xy": b"a's curve"}
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    claims.publishing(catalogue, dead.id, "a", "K", 5, sums)
    for index, (name, data) in enumerate(files.items()):  # Publication.apply, killed
        (out if index == 0 or renamed == "every file" else part).joinpath(name).write_bytes(data)
    with catalogue._connect() as db:  # a's lease runs out (or Prefect says it crashed)
        db.execute("UPDATE processed_datasets SET lease_expires = 0 WHERE id = ?", (dead.id,))
    taken, _ = claims.claim(catalogue, "K", "b", "diffraction", 5, take_from="a")
    again = claims.reserve(catalogue, reservation(out, "b"), 5, dead="a")
    assert taken and (again.version, again.processed_path) == (1, str(out))
    assert sorted(p.name for p in out.iterdir()) == []  # a's files and part folder gone
    assert catalogue.get(dead.id).status == "failed"
    assert "while publishing its results" in catalogue.get(dead.id).message
    # A file of the same name changed since a published it is nobody's to remove: held.
    claims.publishing(catalogue, again.id, "b", "K", 5, sums)
    (out / "result.h5").write_bytes(b"changed by hand")
    with catalogue._connect() as db:
        db.execute("UPDATE processed_datasets SET lease_expires = 0 WHERE id = ?", (again.id,))
    third = claims.reserve(catalogue, reservation(out, "c"), 5, dead="b")
    assert third.version == 2 and (out / "result.h5").read_bytes() == b"changed by hand"
    # Killed after completing its record, before removing its part folder: the next run
    # of the dataset (in the next version) removes it.
    catalogue.register(third.model_copy(update={"status": "completed"}))
    left = Path(third.processed_path) / ".calypso-partial-c" / "step-integrate"
    left.mkdir(parents=True)
    claims.reserve(catalogue, reservation(out, "d"), 5)
    assert not left.parent.exists()


def test_results_are_staged_until_published_and_put_back_when_it_fails(tmp_path):
    out = tmp_path / "out"
    work = out / ".calypso-partial-run"
    work.mkdir(parents=True)
    (out / "old.h5").write_text("an older result")
    with preparing(work) as publication:
        with atomic_outputs(out / "new.png", out / "old.h5") as (png, h5):
            png.write_text("png")
            h5.write_text("new")
        assert not (out / "new.png").exists()  # staged, not published
        assert png == work / "results" / "new.png"
    sums = publication.checksums(out)
    assert sums["old.h5"] == hashlib.sha256(b"new").hexdigest()
    publication.apply()
    assert (out / "old.h5").read_text() == "new" and (out / "new.png").exists()
    publication.undo()  # the record could not be completed: as before
    assert (out / "old.h5").read_text() == "an older result"
    assert not (out / "new.png").exists() and png.read_text() == "png"


def test_the_watchers_verdict_counts_only_a_run_that_processed(tmp_path):
    now = time.time()
    done = Claim("k", "a", "diffraction", "done", 0)
    live = Claim("k", "a", "diffraction", "running", now + 60)
    expired = Claim("k", "a", "diffraction", "running", now - 1)
    failed = Claim("k", "a", "diffraction", "failed", 0)
    assert verdict(done, [("a", "COMPLETED"), ("b", "COMPLETED")]) == "done"
    assert verdict(live, [("a", "RUNNING")]) == "wait"
    # Killed: the runner saw it crash, or (serve killed too) it stays RUNNING but its
    # lease ran out; a duplicate that found it alive completed doing nothing.
    assert verdict(live, [("a", "CRASHED"), ("b", "COMPLETED")]) == "again"
    assert verdict(expired, [("a", "RUNNING"), ("b", "COMPLETED")]) == "again"
    assert verdict(expired, [("a", "CRASHED"), ("b", "SCHEDULED")]) == "wait"
    assert verdict(failed, [("a", "FAILED")]) == "failed"
    assert verdict(None, [("a", "SCHEDULED")]) == "wait"
    assert verdict(None, []) == "again"  # the server lost the event
    assert verdict(None, [("a", "FAILED")]) == "failed"  # refused before claiming


def test_keys_are_the_same_whatever_the_spelling(tmp_path):
    real = tmp_path / "visitor" / "ih0001"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "visitor")
    spellings = [real, tmp_path / "link" / "ih0001", tmp_path / "visitor" / "x" / ".." / "ih0001"]
    (tmp_path / "visitor" / "x").mkdir()
    keys = {processing_key(str(p), (1,), "diffraction", "1", {"npt": 10}) for p in spellings}
    assert len(keys) == 1


def test_a_claimed_announcement_is_posted_by_the_next_watcher(tmp_path):
    state = WatchState(tmp_path / "watch.sqlite")
    acquisition = Acquisition("/raw/d", "diffraction", (1,), {}, "id00", "ih0001")
    event = acquisition.event("1")
    key = event["payload"]["key"]
    assert state.claim(acquisition, key, "1", event["id"], event)
    # The watcher is killed here. A live one sharing the state leaves a fresh claim alone;
    # one that starts (stale after 0 s) posts it, once.
    assert state.pending(stale_after_s=60) == []
    assert state.pending(stale_after_s=0) == [(key, event)]
    assert state.pending(stale_after_s=60) == []
    assert not state.claim(acquisition, key, "1", event["id"], event)  # not announced twice


# -- publishing with the record, versions (in-process runs on a shared cluster) -------------


@pytest.fixture
def sample(tmp_path):
    from calypso.flows.samples.diffraction import write_diffraction_sample

    return write_diffraction_sample(tmp_path / "visitor", frames=4, frames_per_file=2, seed=5)


def run_diffraction(sample, scheduler: str, npt: int = 100, output: str | None = None) -> dict:
    from calypso.flows.api import run_technique
    from calypso.settings import load_settings
    from calypso.techniques.diffraction import DiffractionParameters

    parameters = DiffractionParameters(
        poni=str(sample.calibration["poni"]), mask=str(sample.calibration["mask"]), npt=npt
    )
    settings = load_settings(executor={"kind": "address", "address": scheduler})
    return run_technique(
        "diffraction", str(sample.raw_dataset_dir), parameters, None, output, settings
    )


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def calypso(capsys, *arguments: str) -> str:
    from calypso.flows.cli import main

    assert main(list(arguments)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_rerun_writes_a_version_beside_the_old_one_whose_record_stays_true(
    sample, scheduler, catalogue_path, capsys
):
    first = run_diffraction(sample, scheduler, npt=100)
    v1 = Path(first["processed_dataset_dir"])
    assert v1 == sample.dataset.processed_dataset_dir("diffraction")  # as a first run always was
    before = digest(v1)
    assert set(before) == {"CeO2_0001.h5", "CeO2_0001.png", "CeO2_0001_0001_pilatus1m.xy"}
    second = run_diffraction(sample, scheduler, npt=150)
    v2 = Path(second["processed_dataset_dir"])
    assert v2 == v1.with_name("diffraction_v2") and Path(second["png"]).parent == v2
    assert digest(v1) == before  # untouched by the rerun
    with h5py.File(v2 / "CeO2_0001.h5", "r") as h5:
        assert h5["1.1/pilatus1m_integrate/integrated/intensity"].shape == (4, 150)
    records = sorted(SQLiteCatalogue(catalogue_path).list(), key=lambda r: r.id)
    assert [(r.version, r.status, r.processed_path) for r in records] == [
        (1, "completed", str(v1)),
        (2, "completed", str(v2)),
    ]
    assert records[0].checksums == before  # the old record still describes its files
    assert records[0].outputs[0].startswith(str(v1 / "CeO2_0001.h5"))

    raw = str(sample.raw_dataset_dir)
    shown = calypso(capsys, "catalogue", "versions", raw)
    assert "v1" in shown and "v2" in shown and "3 files ok" in shown and "npt=150" in shown
    assert calypso(capsys, "catalogue", "versions", str(records[1].id)) == shown  # by an id
    assert "would remove 3 files of v1" in calypso(capsys, "catalogue", "prune", raw)
    assert digest(v1) == before  # a dry run
    assert "removed 3 files of v1" in calypso(capsys, "catalogue", "prune", raw, "--yes")
    assert not v1.exists() and digest(v2) == records[1].checksums
    assert SQLiteCatalogue(catalogue_path).get(records[0].id).status == "pruned"
    assert "nothing to prune" in calypso(capsys, "catalogue", "prune", raw, "--yes")


@pytest.mark.slow
def test_a_locked_catalogue_publishes_nothing_and_a_later_run_succeeds(
    sample, scheduler, catalogue_path, tmp_path, monkeypatch
):
    from calypso.registry import sqlite as shared_sqlite

    monkeypatch.setattr(shared_sqlite, "_BUSY_TIMEOUT_S", 1)  # instead of 30 s
    monkeypatch.setenv("CALYPSO_CATALOGUE__LEASE_S", "1")
    output = tmp_path / "out"
    locked, release = threading.Event(), threading.Event()

    def hold_the_catalogue() -> None:  # once the run works (planned, reserved): lock it
        deadline = time.monotonic() + 120
        while not list(output.glob(".calypso-partial-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        db = sqlite3.connect(catalogue_path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # a writer that never finishes
        locked.set()
        release.wait(120)
        db.execute("ROLLBACK")
        db.close()

    holder = threading.Thread(target=hold_the_catalogue, daemon=True)
    holder.start()
    try:
        with pytest.raises(CatalogueError) as refused:
            run_diffraction(sample, scheduler, output=str(output))
    finally:
        release.set()
        holder.join(10)
    assert locked.is_set()
    message = str(refused.value)
    print(message)
    assert f"the catalogue {catalogue_path} is locked" in message and "fuser" in message
    assert "NOT published" in message and "retry this flow run" in message
    assert not (output / "CeO2_0001.h5").exists() and not (output / "CeO2_0001.png").exists()
    [staged] = output.glob(".calypso-partial-*/results/CeO2_0001.h5")
    assert str(staged.parent) in message
    assert [r.status for r in SQLiteCatalogue(catalogue_path).list()] == ["running"]

    time.sleep(1.1)  # the failed run's lease runs out: its reservation holds nothing
    again = run_diffraction(sample, scheduler, output=str(output))
    assert again["processed_dataset_dir"] == str(output)  # the same folder: nothing was there
    statuses = sorted(r.status for r in SQLiteCatalogue(catalogue_path).list())
    assert statuses == ["completed", "failed"]
    assert (output / "CeO2_0001.h5").is_file()


def test_a_ctrl_c_after_planning_before_the_work_registers_the_run_interrupted(
    sample, scheduler, catalogue_path, tmp_path, monkeypatch
):
    """A Ctrl-C after the planning step reserved the run's record, before the run's part
    folder exists (as Prefect saves the result block the chunks use): the record says
    "interrupted", not "running" until its lease runs out."""
    from calypso.flows import flow_run

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(flow_run, "save_result_block", ctrl_c)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_diffraction(sample, scheduler, output=str(output))
    [record] = SQLiteCatalogue(catalogue_path).list()
    assert record.status == "failed" and record.message.startswith("interrupted"), record
    assert not list(output.glob(".calypso-partial-*"))


# -- the real thing: `calypso serve` and `calypso watch` as processes, killed ------------

LEASE_S = 2  # leases of these tests' flow runs
# The watcher looks at its announcements this often: longer than Prefect takes to turn an
# event into a flow run on a busy machine, else it would post again events not lost.
CONFIRM_S = 10


class Plant:
    """`calypso serve` (diffraction) with short leases, its data trees, and watchers."""

    def __init__(self, work: Path, tomography: bool = False, poll_s: float = 1.0) -> None:
        """``tomography``: served too, with a rule giving it whole datasets of ``pco``.
        ``poll_s``: how often serve asks for runs to start (besides when told)."""
        import shutil

        from calypso.flows.samples.diffraction import write_diffraction_sample

        self.work = work
        self.tree = work / "visitor"
        self.link = work / "visitor-link"  # the same tree, spelled through a symlink
        # The calibration inside the proposal, where a served run may read it (issue #20).
        folder = self.tree / "ih0001" / "calibration"
        folder.mkdir(parents=True)
        calibration = write_diffraction_sample(work / "calibration", frames=1).calibration
        calibration = {k: Path(shutil.copy(v, folder / v.name)) for k, v in calibration.items()}
        self.link.symlink_to(self.tree)
        rule = {
            "technique": "diffraction",
            "detector": "pilatus*",
            "parameters": {
                "poni": str(calibration["poni"]),
                "mask": str(calibration["mask"]),
                "npt": 100,
                "chunk_size": 2,  # many small tasks: a run lasts long enough to be killed
            },
        }
        tomography_rules = (
            [{"technique": "tomography", "detector": "pco*", "unit": "dataset"}]
            if tomography
            else []
        )
        self.home = work / "home"
        self.env = dict(os.environ)
        self.env.pop("CALYPSO_CATALOGUE__PATH", None)
        self.env.update(
            CALYPSO_HOME=str(self.home),
            CALYPSO_DATA_ROOTS=json.dumps([str(self.tree)]),
            CALYPSO_WATCH__BEAMLINES=json.dumps({"id00": [rule, *tomography_rules]}),
            CALYPSO_WATCH__INTERVAL_S="1",
            CALYPSO_WATCH__QUIET_S="30",
            CALYPSO_WATCH__CONFIRM_S=str(CONFIRM_S),
            CALYPSO_CATALOGUE__LEASE_S=str(LEASE_S),
            CALYPSO_SERVE__DEFAULT_CONCURRENCY="2",
            CALYPSO_EXECUTOR__N_WORKERS="1",
            CALYPSO_SERVE__POLL_S=str(poll_s),
        )
        techniques = ["--technique", "diffraction"] + (
            ["--technique", "tomography"] if tomography else []
        )
        self.serve = start(["serve", *techniques], self.env, work / "serve.log")
        self.watchers: list[subprocess.Popen] = []
        self.deployment_id = wait_until(self._deployment_id, 180, "the deployment", 1)

    def _deployment_id(self):
        from prefect.client.orchestration import get_client

        from calypso.flows.techniques import TECHNIQUES

        assert self.serve.poll() is None, (self.work / "serve.log").read_text()[-3000:]
        with get_client(sync_client=True) as client:
            try:
                deployment = client.read_deployment_by_name("diffraction/diffraction")
            except Exception:
                return None
        return deployment.id if deployment.version == TECHNIQUES["diffraction"].version else None

    def watch(self, root: Path, state: str = "watch.sqlite", api: str | None = None):
        env = self.env | {"CALYPSO_WATCH__STATE_PATH": str(self.home / state)}
        if api:
            env["PREFECT_API_URL"] = api
        watcher = start(["watch", str(root)], env, self.work / f"{state}.log")
        self.watchers.append(watcher)
        return watcher

    def runs(self, raw: Path) -> list:
        """The flow runs of the dataset ``raw``, oldest first."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[self.deployment_id])
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
        return [r for r in runs if r.parameters.get("raw") == os.path.realpath(raw)]

    def settled(self, raw: Path, count: int):
        """The runs of ``raw`` once ``count`` are final and none is pending."""
        runs = self.runs(raw)
        final = [r for r in runs if r.state and r.state.is_final()]
        return runs if len(final) >= count and len(final) == len(runs) else None

    def records(self, raw: Path) -> list[ProcessedDataset]:
        path = self.home / "catalogue.sqlite"
        if not path.exists():
            return []
        found = SQLiteCatalogue(path).list(limit=1000)
        return sorted(
            (r for r in found if r.raw_dataset == os.path.realpath(raw)), key=lambda r: r.id
        )

    def announcements(self, raw: Path, state: str = "watch.sqlite") -> list[tuple]:
        path = self.home / state
        if not path.exists():
            return []
        try:
            with sqlite3.connect(path) as db:
                return db.execute(
                    "SELECT state, attempts FROM acquisitions WHERE raw_dataset = ?",
                    (os.path.realpath(raw),),
                ).fetchall()
        except sqlite3.OperationalError as exc:  # the file is there, its table not yet
            if "no such table" not in str(exc):
                raise
            return []

    def stop_watchers(self, sig: int = signal.SIGTERM) -> None:
        for watcher in self.watchers:
            stop(watcher, sig)
        self.watchers.clear()

    def close(self) -> None:
        self.stop_watchers()
        stop(self.serve)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # leave the shared server clean
            client.delete_deployment(self.deployment_id)


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    site = Plant(tmp_path_factory.mktemp("plant"))
    yield site
    site.close()


@pytest.mark.slow
def test_two_watchers_through_a_symlinked_root_process_a_dataset_once(plant):
    from calypso.flows.samples.diffraction import write_diffraction_sample

    plant.watch(plant.tree, state="one.sqlite")
    plant.watch(plant.link, state="two.sqlite")  # another spelling, another state
    sample = write_diffraction_sample(plant.link, frames=2, dataset_number=3, seed=23)
    raw = Path(os.path.realpath(sample.raw_dataset_dir))
    confirmed = [("confirmed", 1)]
    for state in ("one.sqlite", "two.sqlite"):  # then nothing is posted again
        wait_until(lambda s=state: plant.announcements(raw, s) == confirmed, 300, "confirmed")
    runs = plant.runs(raw)
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    [record] = plant.records(raw)
    assert record.status == "completed"
    assert record.raw_dataset == str(raw) and "visitor-link" not in record.processed_path
    assert all("visitor-link" not in url for url in record.outputs)
    assert runs[0].parameters["raw"] == str(raw)  # the event names the canonical path
    plant.stop_watchers()


def flow_run_process(serve: subprocess.Popen, run_id) -> object | None:
    """The process of flow run ``run_id``, the one run in flight: serve's runner forks it
    from its fork server (calypso.flows.online.warm_starts)."""
    import psutil

    runs = []
    for child in psutil.Process(serve.pid).children(recursive=True):
        try:
            if "forkserver" in " ".join(child.parent().cmdline()):
                runs.append(child)
        except psutil.Error:
            continue
    return runs[0] if len(runs) == 1 else None


@pytest.mark.slow
def test_a_flow_run_killed_mid_run_is_processed_again_once(plant):
    from calypso.flows.samples.diffraction import write_diffraction_sample

    plant.watch(plant.tree, state="one.sqlite")  # knows the dataset of the test above
    sample = write_diffraction_sample(plant.tree, frames=16, frames_per_file=8, seed=21)
    raw = sample.raw_dataset_dir
    output = sample.dataset.processed_dataset_dir("diffraction")
    [first] = wait_until(lambda: plant.runs(raw), 120, "the acquisition's flow run")
    parts = output / f".calypso-partial-{first.id}"
    wait_until(lambda: len(list(parts.glob("step-*/*.h5"))) >= 2, 240, "a few chunks", 0.05)
    process = wait_until(lambda: flow_run_process(plant.serve, first.id), 30, "its process")
    process.kill()  # SIGKILL: no state, no record, no finally

    confirmed = [("confirmed", 2)]  # posted twice: once, then once again after the kill
    wait_until(lambda: plant.announcements(raw, "one.sqlite") == confirmed, 300, "confirmed")
    runs = plant.runs(raw)
    print(f"states: {[r.state.name for r in runs]}")
    assert [r.state.type.value for r in runs] == ["CRASHED", "COMPLETED"]
    completed = [r for r in plant.records(raw) if r.status == "completed"]
    assert [r.flow_run_id for r in completed] == [str(runs[1].id)]  # processed once
    assert completed[0].processed_path == str(output) and completed[0].version == 1
    with h5py.File(output / "CeO2_0001.h5", "r") as h5:
        assert h5["1.1/pilatus1m_integrate/integrated/intensity"].shape == (16, 100)
    dead = next(r for r in plant.records(raw) if r.flow_run_id == str(first.id))
    assert dead.status == "failed" and "stopped before publishing" in dead.message
    assert not parts.exists()  # the dead run's part folder went with the takeover


class HangingApi:
    """A Prefect API that answers its health check and never answers a posted event: the
    watcher stays between claiming an announcement and posting it, to be killed there."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # /api/health
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"true")

            def do_POST(self):  # /api/events: hang
                time.sleep(60)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_watcher_killed_between_claim_and_post_announces_after_restart_once(plant):
    from calypso.flows.samples.diffraction import write_diffraction_sample

    plant.stop_watchers()
    api = HangingApi()
    try:
        watcher = plant.watch(plant.tree, state="one.sqlite", api=api.url)
        sample = write_diffraction_sample(plant.tree, frames=2, dataset_number=2, seed=22)
        raw = sample.raw_dataset_dir
        claimed = [("claimed", 0)]
        wait_until(lambda: plant.announcements(raw, "one.sqlite") == claimed, 120, "the claim")
        stop(watcher, signal.SIGKILL)  # between claiming and posting
    finally:
        api.close()
    assert plant.runs(raw) == []  # never announced
    plant.watchers.clear()
    plant.watch(plant.tree, state="one.sqlite")  # a restart, against the real server
    confirmed = [("confirmed", 1)]
    wait_until(lambda: plant.announcements(raw, "one.sqlite") == confirmed, 300, "confirmed")
    runs = plant.runs(raw)
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    assert [r.status for r in plant.records(raw)] == ["completed"]
