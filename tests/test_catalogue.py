"""The embedded catalogue's schema upgrades keep what older catalogues hold."""

from __future__ import annotations

import sqlite3

from calypso.registry import SQLiteCatalogue

OLD_OUTBOX = """
CREATE TABLE processed_datasets (
    id INTEGER PRIMARY KEY AUTOINCREMENT, technique TEXT NOT NULL, raw_dataset TEXT NOT NULL,
    processed_path TEXT NOT NULL, outputs TEXT NOT NULL, proposal TEXT, beamline TEXT,
    sample_name TEXT, flow_run_id TEXT, parameters TEXT NOT NULL,
    software TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL, message TEXT, started TEXT,
    finished TEXT, duration_s REAL, frames INTEGER,
    registered TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id INTEGER NOT NULL UNIQUE REFERENCES processed_datasets (id),
    destination TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')), delivered TEXT);
INSERT INTO processed_datasets (technique, raw_dataset, processed_path, outputs, parameters,
    status) VALUES ('diffraction', '/raw', '/processed', '[]', '{}', 'completed');
INSERT INTO outbox (record_id, destination, payload) VALUES (1, 'icat', '{"path": "/processed"}');
"""


def test_an_outbox_made_before_keys_is_upgraded_with_its_entries(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_OUTBOX)
    catalogue = SQLiteCatalogue(path)
    [entry] = catalogue.outbox("pending")
    assert (entry.record_id, entry.key, entry.payload) == (1, "icat:1", {"path": "/processed"})
    assert not catalogue.enqueue(1, "icat", {"path": "/processed"})  # still owed once
    assert catalogue.enqueue(1, "icat-metadata", {"n": 1}, key="export:1:s3://b/p")
    assert catalogue.exports(record_id=1) == []


def test_results_removed_with_their_folder_hold_no_version(tmp_path):
    """`calypso demo` run again removes its folder, results included, and its records
    stayed completed ('3 files missing'): the new results went to `_v2`, and README's
    path to the result no longer existed (a fresh-checkout walk)."""
    from calypso.registry import ProcessedDataset, claims
    from calypso.registry.versions import removed_with

    catalogue = SQLiteCatalogue(tmp_path / "c.sqlite")
    demo, kept = tmp_path / "demo-data", tmp_path / "mine"

    def reserved(folder, run):
        record = ProcessedDataset(
            technique="diffraction", raw_dataset=str(folder / "RAW"),
            processed_path=str(folder / "diffraction"),
            output_file=str(folder / "diffraction" / "r.h5"), flow_run_id=run,
            status="running",
        )  # fmt: skip
        return claims.reserve(catalogue, record, 60)

    old, other = reserved(demo, "a"), reserved(kept, "b")
    for record in (old, other):
        catalogue.register(record.model_copy(update={"status": "completed"}))
    assert removed_with(catalogue, demo, "calypso demo wrote it again") == 1
    assert catalogue.get(old.id).status == "pruned"
    assert "calypso demo wrote it again" in catalogue.get(old.id).message
    assert catalogue.get(other.id).status == "completed"
    again = reserved(demo, "c")  # the new result goes where the old one was
    assert (again.version or 1) == 1 and again.processed_path == old.processed_path
