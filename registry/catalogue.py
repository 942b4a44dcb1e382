"""The catalogue of processed datasets.

:class:`Catalogue` is the interface every backend implements; the embedded
:class:`SQLiteCatalogue` is the default and keeps a record of every
registration. A facility catalogue (ICAT) implements the same interface.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from calypso.errors import CatalogueError
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
    status: Status = "completed"
    message: str | None = None
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    frames: int | None = None


class Catalogue(Protocol):
    """What Calypso needs from a catalogue backend."""

    def register(self, record: ProcessedDataset) -> int: ...

    def get(self, record_id: int) -> ProcessedDataset: ...

    def list(self, technique: str | None = None, limit: int = 50) -> list[ProcessedDataset]: ...


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
    status TEXT NOT NULL,
    message TEXT,
    started TEXT,
    finished TEXT,
    duration_s REAL,
    frames INTEGER,
    registered TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX IF NOT EXISTS processed_by_raw ON processed_datasets (raw_dataset);
"""

_JSON_FIELDS = ("outputs", "parameters")


class SQLiteCatalogue:
    """The embedded catalogue: one SQLite file, safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise CatalogueError(
                f"cannot open the catalogue {self.path}: {exc}; set CALYPSO_CATALOGUE__PATH "
                "to a writable file"
            ) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def register(self, record: ProcessedDataset) -> int:
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

    @staticmethod
    def _record(row: sqlite3.Row) -> ProcessedDataset:
        values = dict(row)
        values.pop("registered", None)
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        return ProcessedDataset(**values)


def open_catalogue(settings: CalypsoSettings) -> Catalogue:
    """The catalogue the settings ask for."""
    return SQLiteCatalogue(settings.catalogue_path)
