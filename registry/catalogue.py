"""The catalogue of processed datasets.

:class:`Catalogue` is the interface every backend implements; the embedded
:class:`SQLiteCatalogue` is the default and keeps a record of every
registration. A facility catalogue (ICAT) implements the same interface.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from calypso.errors import CatalogueError
from calypso.registry.sqlite import _statements, connect, create_database
from calypso.settings import CalypsoSettings

Status = Literal["completed", "failed"]


class ProcessedDataset(BaseModel):
    """One processed dataset: what was reduced, how, and where the results are."""

    id: int | None = None
    technique: str
    raw_dataset: str = Field(..., description="Raw dataset folder (or input files).")
    processed_path: str = Field(..., description="Folder holding the results.")
    outputs: list[str] = Field(default_factory=list, description="Result files (NeXus URLs).")
    proposal: str | None = None
    beamline: str | None = None
    sample_name: str | None = None
    flow_run_id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    software: dict[str, str] = Field(default_factory=dict, description="Software versions.")
    status: Status = "completed"
    message: str | None = None
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    frames: int | None = None


class Catalogue(Protocol):
    """What Calypso needs from a catalogue backend.

    ``last_warning`` says what went wrong, without failing, in the latest
    ``register`` (e.g. a registration left waiting in the outbox).
    """

    last_warning: str | None

    def register(self, record: ProcessedDataset) -> int: ...

    def get(self, record_id: int) -> ProcessedDataset: ...

    def list(self, technique: str | None = None, limit: int = 50) -> list[ProcessedDataset]: ...

    def claim_processing(self, key: str, flow_run_id: str, technique: str) -> str | None: ...

    def record_export(self, export: ExportRecord) -> int: ...

    def exports(
        self, record_id: int | None = None, source: str | None = None
    ) -> list[ExportRecord]: ...

    def find_by_processed_path(self, path: str) -> ProcessedDataset | None: ...

    def note(self, record_id: int, key: str, name: str, value: str) -> str | None:
        """Owe the facility catalogue a metadata update (a warning when it waits); the
        embedded catalogue has nobody to tell."""
        ...


_OUTBOX = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id INTEGER NOT NULL REFERENCES processed_datasets (id),
    destination TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    delivered TEXT
);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed_datasets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    technique TEXT NOT NULL,
    raw_dataset TEXT NOT NULL,
    processed_path TEXT NOT NULL,
    outputs TEXT NOT NULL,
    proposal TEXT,
    beamline TEXT,
    sample_name TEXT,
    flow_run_id TEXT,
    parameters TEXT NOT NULL,
    software TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    message TEXT,
    started TEXT,
    finished TEXT,
    duration_s REAL,
    frames INTEGER,
    registered TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX IF NOT EXISTS processed_by_raw ON processed_datasets (raw_dataset);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id INTEGER REFERENCES processed_datasets (id),
    source TEXT NOT NULL,
    uri TEXT NOT NULL,
    manifest TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    uploaded INTEGER NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    finished TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX IF NOT EXISTS exports_by_record ON exports (record_id);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    flow_run_id TEXT NOT NULL,
    technique TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
"""

# Catalogues made before the outbox could hold more than one entry a record
# (an ICAT registration, then its export notes) get the keyed table.
_OUTBOX_WITH_KEYS = (
    "ALTER TABLE outbox RENAME TO outbox_before_keys;"
    + _OUTBOX
    + """
INSERT INTO outbox SELECT id, record_id, destination, destination || ':' || record_id,
    payload, state, attempts, last_error, created, delivered FROM outbox_before_keys;
DROP TABLE outbox_before_keys;
"""
)


class OutboxEntry(BaseModel):
    """A registration waiting for (or done with) delivery to an external catalogue."""

    id: int
    record_id: int
    destination: str
    key: str
    payload: dict[str, Any]
    state: Literal["pending", "sending", "delivered"]
    attempts: int
    last_error: str | None = None
    created: str
    delivered: str | None = None


class ExportRecord(BaseModel):
    """A completed (and, if ``verified``, read back and checked) export of a dataset."""

    id: int | None = None
    record_id: int | None = Field(None, description="Catalogue id of the exported dataset.")
    source: str = Field(..., description="Local folder that was exported.")
    uri: str = Field(..., description="Where its files are now (no credentials).")
    manifest: str = Field(..., description="URI of the SHA-256 manifest.")
    files: int
    bytes: int
    uploaded: int = Field(..., description="Files sent by the last run (others were there).")
    verified: bool = False
    finished: str | None = None


_JSON_FIELDS = ("outputs", "parameters", "software")


# Bump when _SCHEMA, _OUTBOX or _migrate change: files stamped lower are migrated once.
CATALOGUE_SCHEMA_VERSION = 1


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalogue made by an older Calypso up to the current schema."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(processed_datasets)")}
    if "software" not in columns:  # catalogues made before software was recorded
        db.execute("ALTER TABLE processed_datasets ADD COLUMN software TEXT NOT NULL DEFAULT '{}'")
    outbox_columns = {row["name"] for row in db.execute("PRAGMA table_info(outbox)")}
    if "key" not in outbox_columns:
        for statement in _statements(_OUTBOX_WITH_KEYS):
            db.execute(statement)


class SQLiteCatalogue:
    """The embedded catalogue: one SQLite file, safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.last_warning: str | None = None
        create_database(
            self.path,
            _SCHEMA + _OUTBOX,
            CatalogueError,
            "the catalogue",
            "set CALYPSO_CATALOGUE__PATH to a writable file",
            migrate=_migrate,
            name="catalogue",
            version=CATALOGUE_SCHEMA_VERSION,
        )

    def _connect(self):
        return connect(self.path)

    def register(self, record: ProcessedDataset) -> int:
        """Record a processed dataset; a retry of the same flow run returns the first record."""
        if record.flow_run_id and record.status == "completed":
            with self._connect() as db:
                row = db.execute(
                    "SELECT id FROM processed_datasets WHERE flow_run_id = ? AND technique = ? "
                    "AND processed_path = ? AND status = 'completed'",
                    (record.flow_run_id, record.technique, record.processed_path),
                ).fetchone()
            if row is not None:
                return int(row["id"])
        values = record.model_dump(exclude={"id"})
        for name in _JSON_FIELDS:
            values[name] = json.dumps(values[name], default=str)
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        try:
            with self._connect() as db:
                cursor = db.execute(
                    f"INSERT INTO processed_datasets ({columns}) VALUES ({marks})", values
                )
                return int(cursor.lastrowid)
        except sqlite3.Error as exc:
            raise CatalogueError(f"cannot register in the catalogue {self.path}: {exc}") from None

    def get(self, record_id: int) -> ProcessedDataset:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM processed_datasets WHERE id = ?", (record_id,)
            ).fetchone()
        if row is None:
            raise CatalogueError(f"the catalogue {self.path} has no processed dataset {record_id}")
        return self._record(row)

    def list(self, technique: str | None = None, limit: int = 50) -> list[ProcessedDataset]:
        query = "SELECT * FROM processed_datasets"
        arguments: tuple[Any, ...] = ()
        if technique:
            query += " WHERE technique = ?"
            arguments = (technique,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            rows = db.execute(query, (*arguments, limit)).fetchall()
        return [self._record(row) for row in rows]

    # -- the outbox: registrations owed to an external catalogue ---------------

    def enqueue(
        self, record_id: int, destination: str, payload: dict[str, Any], key: str | None = None
    ) -> bool:
        """Owe ``payload`` to ``destination``; False if the same ``key`` (by default one per
        record and destination) is already owed or sent."""
        key = key or f"{destination}:{record_id}"
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO outbox (record_id, destination, key, payload) "
                "VALUES (?, ?, ?, ?)",
                (record_id, destination, key, json.dumps(payload, default=str)),
            )
            return cursor.rowcount == 1

    def claim(self, destination: str) -> OutboxEntry | None:
        """Take the oldest pending entry for delivery; no other process can take it meanwhile."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT * FROM outbox WHERE destination = ? AND state = 'pending' "
                "ORDER BY id LIMIT 1",
                (destination,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ?",
                (row["id"],),
            )
        return self._entry({**dict(row), "state": "sending", "attempts": row["attempts"] + 1})

    def settle(self, entry_id: int, error: str | None = None) -> None:
        """Mark an entry delivered, or (with ``error``) pending again."""
        with self._connect() as db:
            if error is None:
                db.execute(
                    "UPDATE outbox SET state = 'delivered', last_error = NULL, "
                    "delivered = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?",
                    (entry_id,),
                )
            else:
                db.execute(
                    "UPDATE outbox SET state = 'pending', last_error = ? WHERE id = ?",
                    (error, entry_id),
                )

    def release_stale(self, destination: str) -> int:
        """Return entries left 'sending' by a process that died back to 'pending'."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE outbox SET state = 'pending' WHERE destination = ? AND state = 'sending'",
                (destination,),
            )
            return cursor.rowcount

    # -- processing claims: each acquisition processed once ----------------------

    def claim_processing(self, key: str, flow_run_id: str, technique: str) -> str | None:
        """Take the processing ``key`` for ``flow_run_id``; None if taken (or already ours),
        else the flow run holding it. A key held by a run that failed is taken over."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT flow_run_id FROM claims WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO claims (key, flow_run_id, technique) VALUES (?, ?, ?)",
                    (key, flow_run_id, technique),
                )
                return None
            holder = row["flow_run_id"]
            if holder == flow_run_id:  # a retry of the same run
                return None
            statuses = {
                r["status"]
                for r in db.execute(
                    "SELECT status FROM processed_datasets WHERE flow_run_id = ?", (holder,)
                )
            }
            if statuses and "completed" not in statuses:  # the holder failed: take over
                db.execute("UPDATE claims SET flow_run_id = ? WHERE key = ?", (flow_run_id, key))
                return None
            return holder

    def note(self, record_id: int, key: str, name: str, value: str) -> str | None:
        return None  # the embedded catalogue keeps the export record itself

    # -- exports --------------------------------------------------------------

    def record_export(self, export: ExportRecord) -> int:
        values = export.model_dump(exclude={"id", "finished"})
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        with self._connect() as db:
            cursor = db.execute(f"INSERT INTO exports ({columns}) VALUES ({marks})", values)
            return int(cursor.lastrowid)

    def exports(
        self, record_id: int | None = None, source: str | None = None
    ) -> list[ExportRecord]:
        """Exports of a catalogue record or of a source folder, oldest first."""
        query, arguments = "SELECT * FROM exports", []
        if record_id is not None:
            query, arguments = query + " WHERE record_id = ?", [record_id]
        elif source is not None:
            query, arguments = query + " WHERE source = ?", [source]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", arguments).fetchall()
        return [ExportRecord(**dict(row)) for row in rows]

    def find_by_processed_path(self, path: str) -> ProcessedDataset | None:
        """The latest completed record whose results are in ``path``."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM processed_datasets WHERE processed_path = ? "
                "AND status = 'completed' ORDER BY id DESC LIMIT 1",
                (path,),
            ).fetchone()
        return None if row is None else self._record(row)

    def outbox(self, state: str | None = None) -> list[OutboxEntry]:
        query, arguments = "SELECT * FROM outbox", ()
        if state:
            query, arguments = query + " WHERE state = ?", (state,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", arguments).fetchall()
        return [self._entry(dict(row)) for row in rows]

    @staticmethod
    def _entry(values: dict[str, Any]) -> OutboxEntry:
        if isinstance(values["payload"], str):
            values["payload"] = json.loads(values["payload"])
        return OutboxEntry(**values)

    @staticmethod
    def _record(row: sqlite3.Row) -> ProcessedDataset:
        values = dict(row)
        values.pop("registered", None)
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        return ProcessedDataset(**values)


def open_catalogue(settings: CalypsoSettings) -> Catalogue:
    """The catalogue the settings ask for."""
    local = SQLiteCatalogue(settings.catalogue_path)
    if settings.catalogue.backend == "icat":
        from calypso.registry.icat import IcatCatalogue

        return IcatCatalogue(local, settings.catalogue.icat)
    return local
