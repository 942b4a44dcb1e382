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
