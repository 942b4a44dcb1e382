"""The catalogue of processed datasets.

:class:`Catalogue` is the interface every backend implements; the embedded
:class:`SQLiteCatalogue` is the default and keeps a record of every
registration. A facility catalogue (ICAT) implements the same interface.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from calypso.errors import CatalogueError
from calypso.registry import claims
from calypso.registry.outbox import OutboxEntry, message_id, owe
from calypso.registry.sqlite import _statements, connect, create_database
from calypso.settings import CalypsoSettings

# running (reserved by a live flow run, registry/claims.py) -> publishing (its results being
# renamed into place) -> completed or failed; pruned: its files removed (catalogue prune).
Status = Literal["running", "publishing", "completed", "failed", "pruned"]


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
    version: int | None = Field(None, description="n of <folder>_v<n>; 1: the folder itself.")
    output_file: str | None = Field(None, description="The main result file, as planned.")
    key: str | None = Field(None, description="Processing key of the triggering acquisition.")
    checksums: dict[str, str] = Field(
        default_factory=dict, description="SHA-256 of each file published, by relative path."
    )


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


# An entry is 'pending', 'sending' (leased: ``lease_owner`` may send it until ``lease_until``,
# epoch seconds; a sender that died leaves a lease that runs out) or 'delivered' (the broker
# confirmed it). ``message_id`` names the message on the wire, the same on every attempt.
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
    delivered TEXT,
    message_id TEXT,
    lease_owner TEXT,
    lease_until REAL
);
"""
# Columns added to the outbox since its keys; a migration adds each one that is missing.
_OUTBOX_ADDED = {"message_id": "TEXT", "lease_owner": "TEXT", "lease_until": "REAL"}

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
    registered TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    version INTEGER,
    output_file TEXT,
    key TEXT,
    checksums TEXT NOT NULL DEFAULT '{}',
    lease_expires REAL
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
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    state TEXT NOT NULL DEFAULT 'running',
    expires REAL NOT NULL DEFAULT 0,
    record_id INTEGER
);
"""

# Catalogues made before the outbox could hold more than one entry a record
# (an ICAT registration, then its export notes) get the keyed table.
_OUTBOX_WITH_KEYS = (
    "ALTER TABLE outbox RENAME TO outbox_before_keys;"
    + _OUTBOX
    + """
INSERT INTO outbox (id, record_id, destination, key, payload, state, attempts, last_error,
    created, delivered)
SELECT id, record_id, destination, destination || ':' || record_id,
    payload, state, attempts, last_error, created, delivered FROM outbox_before_keys;
DROP TABLE outbox_before_keys;
"""
)


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


_JSON_FIELDS = ("outputs", "parameters", "software", "checksums")


# Bump when _SCHEMA, _OUTBOX or _migrate change: files stamped lower are migrated once.
# 2: the outbox's message id and lease. 3: leased claims, reserved and versioned records.
# Each step below checks what the file has, not the stamp, so concurrent changes compose.
CATALOGUE_SCHEMA_VERSION = 3


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalogue made by an older Calypso up to the current schema."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(processed_datasets)")}
    if "software" not in columns:  # catalogues made before software was recorded
        db.execute("ALTER TABLE processed_datasets ADD COLUMN software TEXT NOT NULL DEFAULT '{}'")
    outbox_columns = {row["name"] for row in db.execute("PRAGMA table_info(outbox)")}
    if "key" not in outbox_columns:
        for statement in _statements(_OUTBOX_WITH_KEYS):
            db.execute(statement)
        outbox_columns = {row["name"] for row in db.execute("PRAGMA table_info(outbox)")}
    for name, kind in _OUTBOX_ADDED.items():  # message ids are given when first claimed
        if name not in outbox_columns:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
    claims.migrate(db)


class SQLiteCatalogue:
    """The embedded catalogue: one SQLite file, safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.last_warning: str | None = None
        try:
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
        except CatalogueError as exc:  # locked or full: that advice would be wrong
            if not claims.busy_or_full(str(exc)):
                raise
            raise CatalogueError(claims.problem(self.path, exc)) from None

    def _connect(self):
        return connect(self.path)

    def register(
        self, record: ProcessedDataset, owed: list[tuple[str, dict[str, Any]]] = ()
    ) -> int:
        """Record a processed dataset; a retry of the same flow run returns the first record.
        A record with an ``id`` completes (or fails) the flow run's reservation, and marks
        its claim done (or failed), in one transaction with the entries ``owed``
        ((destination, payload), e.g. its ICAT registration) put in the outbox."""
        if record.id is not None:
            return claims.complete(self, record, owed)
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
            raise CatalogueError(claims.problem(self.path, exc)) from None

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
        record and destination) is already owed or sent. The entry gets its message id,
        random, so no other catalogue's message can carry it."""
        with self._connect() as db:
            return owe(db, record_id, destination, payload, key)

    def claim(self, destination: str, owner: str, lease_s: float) -> OutboxEntry | None:
        """Lease the oldest entry that is pending, or whose sender's lease ran out (it died),
        to ``owner`` for ``lease_s`` seconds: one transaction, so no two senders get it."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT * FROM outbox WHERE destination = ? AND (state = 'pending' OR "
                "(state = 'sending' AND (lease_until IS NULL OR lease_until < ?))) "
                "ORDER BY id LIMIT 1",
                (destination, now),
            ).fetchone()
            if row is None:
                return None
            leased = {
                "state": "sending",
                "attempts": row["attempts"] + 1,
                "message_id": row["message_id"] or message_id(),  # made before message ids
                "lease_owner": owner,
                "lease_until": now + lease_s,
            }
            db.execute(
                "UPDATE outbox SET state = :state, attempts = :attempts, "
                "message_id = :message_id, lease_owner = :lease_owner, "
                "lease_until = :lease_until WHERE id = :id",
                {**leased, "id": row["id"]},
            )
        return self._entry({**dict(row), **leased})

    def renew(self, entry_id: int, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease by ``lease_s`` from now; False if it is no longer
        ``owner``'s (its lease ran out and another sender took the entry): then do not send."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE outbox SET lease_until = ? "
                "WHERE id = ? AND state = 'sending' AND lease_owner = ?",
                (time.time() + lease_s, entry_id, owner),
            )
            return cursor.rowcount == 1

    def settle(self, entry_id: int, error: str | None = None, owner: str | None = None) -> None:
        """Mark an entry delivered (the broker confirmed it, whoever holds the lease), or
        (with ``error``) pending again, if ``owner`` (when given) still holds it."""
        with self._connect() as db:
            if error is None:
                db.execute(
                    "UPDATE outbox SET state = 'delivered', last_error = NULL, "
                    "lease_owner = NULL, lease_until = NULL, "
                    "delivered = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') "
                    "WHERE id = ? AND state != 'delivered'",
                    (entry_id,),
                )
            else:
                db.execute(
                    "UPDATE outbox SET state = 'pending', last_error = ?, lease_owner = NULL, "
                    "lease_until = NULL WHERE id = ? AND state = 'sending' "
                    "AND (? IS NULL OR lease_owner = ?)",
                    (error, entry_id, owner, owner),
                )

    def release_stale(self, destination: str) -> int:
        """Return entries whose sender's lease ran out (it died) to 'pending', so that they
        show as pending; a live sender's entries are left alone. (Claims take them anyway.)"""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE outbox SET state = 'pending', lease_owner = NULL, lease_until = NULL "
                "WHERE destination = ? AND state = 'sending' "
                "AND (lease_until IS NULL OR lease_until < ?)",
                (destination, time.time()),
            )
            return cursor.rowcount

    # -- processing claims: leases held by live flow runs (registry/claims.py) --------

    def claim_processing(
        self, key: str, flow_run_id: str, technique: str, lease_s: float = claims.LEASE_S
    ) -> str | None:
        """Take the processing ``key`` for ``flow_run_id``; None if taken (or already ours),
        else the flow run holding it (done, or alive: its lease runs)."""
        taken, before = claims.claim(self, key, flow_run_id, technique, lease_s)
        return None if taken or before is None else before.flow_run_id

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
        """The latest completed record whose results are in ``path`` (however spelled)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM processed_datasets WHERE processed_path IN (?, ?) "
                "AND status = 'completed' ORDER BY id DESC LIMIT 1",
                (path, claims.canonical(path)),
            ).fetchone()
        return None if row is None else self._record(row)

    def outbox(self, state: str | None = None) -> list[OutboxEntry]:
        """The outbox, oldest first: every entry, those in ``state``, or (``"owed"``) those
        not delivered yet, pending or being sent."""
        query, arguments = "SELECT * FROM outbox", ()
        if state == "owed":
            query += " WHERE state != 'delivered'"
        elif state:
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
        values.pop("lease_expires", None)
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        return ProcessedDataset(**values)


def embedded(catalogue: Catalogue) -> SQLiteCatalogue:
    """The SQLite catalogue behind any backend: claims, reservations and versions live there."""
    return getattr(catalogue, "local", catalogue)


def open_catalogue(settings: CalypsoSettings) -> Catalogue:
    """The catalogue the settings ask for."""
    local = SQLiteCatalogue(settings.catalogue_path)
    if settings.catalogue.backend == "icat":
        from calypso.registry.icat import IcatCatalogue

        return IcatCatalogue(local, settings.catalogue.icat)
    return local
