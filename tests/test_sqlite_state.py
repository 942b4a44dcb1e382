"""Calypso's SQLite files (catalogue, saved flows, watcher state) under concurrent writers:
WAL, a busy timeout, the schema run once per version, and a warning on network disks."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import time
from pathlib import Path

from calypso.registry import catalogue, sqlite
from calypso.registry.catalogue import ProcessedDataset, SQLiteCatalogue
from calypso.registry.saved_flows import SavedFlows

PROCESSES = 8
RECORDS = 100

# Run by exec in each spawned process: pytest imports test modules under names a fresh
# interpreter may not resolve (--import-mode=importlib), so no function here is the target.
_WORKER = """
from calypso.registry.catalogue import ProcessedDataset, SQLiteCatalogue

barrier.wait(timeout=60)  # all open the new file and write at the same time
try:
    catalogue = SQLiteCatalogue(path)  # the first one creates it, the others wait
    ids = [
        catalogue.register(
            ProcessedDataset(
                technique="diffraction",
                raw_dataset=f"/raw/{worker}/{i}",
                processed_path=f"/processed/{worker}/{i}",
                outputs=[f"/processed/{worker}/{i}/out.h5::/entry"],
                flow_run_id=f"run-{worker}-{i}",
                parameters={"i": i},
            )
        )
        for i in range(records)
    ]
    results.put((worker, ids))
except BaseException as exc:
    results.put((worker, repr(exc)))
"""


def test_eight_processes_register_at_once_without_loss_or_deadlock(tmp_path):
    path = tmp_path / "catalogue.sqlite"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [
        context.Process(
            target=exec,
            args=(
                _WORKER,
                {
                    "path": str(path),
                    "worker": worker,
                    "records": RECORDS,
                    "barrier": barrier,
                    "results": results,
                },
            ),
        )
        for worker in range(PROCESSES)
    ]
    start = time.monotonic()
    for process in processes:
        process.start()
    deadline = start + 120  # a deadlock fails here, not at pytest's timeout
    outcomes = dict(results.get(timeout=max(1, deadline - time.monotonic())) for _ in processes)
    elapsed = time.monotonic() - start
    for process in processes:
        process.join(timeout=max(1, deadline - time.monotonic()))
    errors = {worker: ids for worker, ids in outcomes.items() if isinstance(ids, str)}
    assert errors == {}
    ids = [i for worker_ids in outcomes.values() for i in worker_ids]
    assert len(ids) == len(set(ids)) == PROCESSES * RECORDS
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM processed_datasets").fetchone()[0] == 800
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert all(process.exitcode == 0 for process in processes)
    print(f"{PROCESSES} processes x {RECORDS} records in {elapsed:.1f} s")


def test_the_schema_runs_once_per_version(tmp_path, monkeypatch):
    path = tmp_path / "catalogue.sqlite"
    runs = []
    migrate = catalogue._migrate
    monkeypatch.setattr(catalogue, "_migrate", lambda db: runs.append(1) or migrate(db))
    SQLiteCatalogue(path)
    SQLiteCatalogue(path)
    assert runs == [1]
    # The saved flows share the catalogue's file: the catalogue's stamp must not hide them.
    assert SavedFlows(path).list() == []
    with sqlite3.connect(path) as db:
        stamp = db.execute("PRAGMA user_version").fetchone()[0]
        assert stamp & 0xFF == catalogue.CATALOGUE_SCHEMA_VERSION and stamp >> 8 & 0xFF >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_OLD_CATALOGUE = """
CREATE TABLE processed_datasets (
    id INTEGER PRIMARY KEY AUTOINCREMENT, technique TEXT NOT NULL, raw_dataset TEXT NOT NULL,
    processed_path TEXT NOT NULL, outputs TEXT NOT NULL, proposal TEXT, beamline TEXT,
    sample_name TEXT, flow_run_id TEXT, parameters TEXT NOT NULL, status TEXT NOT NULL,
    message TEXT, started TEXT, finished TEXT, duration_s REAL, frames INTEGER,
    registered TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id INTEGER NOT NULL UNIQUE REFERENCES processed_datasets (id),
    destination TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')), delivered TEXT);
INSERT INTO processed_datasets (technique, raw_dataset, processed_path, outputs, parameters,
    status) VALUES ('diffraction', '/raw', '/processed', '[]', '{}', 'completed');
INSERT INTO outbox (record_id, destination, payload) VALUES (1, 'icat', '{}');
"""


def test_an_old_catalogue_is_migrated_once_then_stamped(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # no software column, an outbox without keys
        db.executescript(_OLD_CATALOGUE)
    old = SQLiteCatalogue(path)
    assert old.get(1).software == {}
    assert [entry.key for entry in old.outbox()] == ["icat:1"]
    record = ProcessedDataset(
        technique="diffraction",
        raw_dataset="/raw/2",
        processed_path="/processed/2",
        software={"calypso": "1"},
    )
    assert SQLiteCatalogue(path).get(old.register(record)).software == {"calypso": "1"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == (
            catalogue.CATALOGUE_SCHEMA_VERSION
        )


MOUNTS = r"""/dev/sda1 / ext4 rw,relatime 0 0
server:/export/data /data nfs4 rw,vers=4.2 0 0
/dev/sdb1 /data/scratch xfs rw 0 0
//nas/share /mnt/my\040share cifs rw 0 0
/dev/sdc1 /database ext4 rw 0 0
"""


def test_network_file_systems_are_found_from_the_mounts_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)

    def found(path: str) -> tuple[str, str] | None:
        return sqlite.network_filesystem(Path(path), mounts)

    assert found("/data/id31/catalogue.sqlite") == ("nfs4", "/data")
    assert found("/data/scratch/catalogue.sqlite") is None  # a local disk mounted inside
    assert found("/database/catalogue.sqlite") is None  # not under /data
    assert found("/mnt/my share/c.sqlite") == ("cifs", "/mnt/my share")
    assert found("/home/c.sqlite") is None
    assert sqlite.network_filesystem(Path("/x"), tmp_path / "no-such-file") is None


def test_on_a_network_disk_the_rollback_journal_is_kept_with_one_warning(
    tmp_path, monkeypatch, caplog
):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/home {tmp_path.resolve()} nfs rw 0 0\n")
    detect = sqlite.network_filesystem
    monkeypatch.setattr(sqlite, "network_filesystem", lambda path: detect(path, mounts))
    path = tmp_path / "catalogue.sqlite"
    with caplog.at_level(logging.WARNING, logger="calypso.registry.sqlite"):
        SQLiteCatalogue(path)
        SQLiteCatalogue(path)
    [warning] = caplog.messages
    assert "network file system (nfs" in warning
    assert "set CALYPSO_CATALOGUE__PATH to a local disk" in warning
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_ctrl_c_as_the_schema_commits_stays_a_ctrl_c(tmp_path):
    # Taken on COMMIT's return, it turned into "cannot open the flow registry ...: cannot
    # rollback - no transaction is active" (exit 5) as `calypso serve` started.
    import pytest

    from calypso.errors import CatalogueError

    def committed_then_interrupted(db: sqlite3.Connection) -> None:
        db.execute("COMMIT")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sqlite.create_database(
            tmp_path / "state.sqlite", "CREATE TABLE t (x INTEGER);", CatalogueError,
            "the test state", "advice", committed_then_interrupted, name="watch state",
        )  # fmt: skip
