"""Saved user flows: immutable, versioned specifications in the catalogue's database.

Each ``save`` of a name adds a version (1, 2, ...) with its owner (the verified identity
that saved it, never a setting), proposal, description and the Calypso version. Saving for
a proposal needs membership of it; saving a new version of a name, or deleting it, is for
its owner or a member of its proposal.

Versions are content-addressed: the SHA-256 of a version's record (its specification,
name, version, owner, proposal, technique ...) is stored with it and checked every time
it is read, so a version changed in place (an SQL ``UPDATE``) is refused, not run. Whoever
may write the database file could recompute the hash too: the file is the service's.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

import calypso
from calypso.errors import CatalogueError, ConfigurationError
from calypso.registry import claims
from calypso.registry.access.errors import AccessError
from calypso.registry.access.identity import Identity
from calypso.registry.sqlite import connect, create_database

# The deployment that runs any saved flow by name (`calypso serve`, prefect.yaml); each
# saved flow also gets a deployment of its own name, so this one is not a flow name.
ANY_SAVED_FLOW = "saved-flow"
# Names become folder names (<technique>_<name>_v<version>) and deployment names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS saved_flows (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    owner TEXT NOT NULL,
    proposal TEXT,
    description TEXT NOT NULL DEFAULT '',
    technique TEXT NOT NULL,
    calypso_version TEXT NOT NULL,
    specification TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    deleted TEXT,
    sha256 TEXT,
    PRIMARY KEY (name, version)
);
"""
# What a version's hash covers: all it is, but whether it was deleted since.
_HASHED = (
    *("name", "version", "owner", "proposal", "description", "technique"),
    *("calypso_version", "specification", "created"),
)


def record_hash(record: dict) -> str:
    """SHA-256 of a version's record, canonical JSON of the fields in ``_HASHED``."""
    canonical = json.dumps({key: record[key] for key in _HASHED}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _migrate(db: sqlite3.Connection) -> None:
    """Version 2: the hash column; versions saved before it are hashed as found now."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(saved_flows)")}
    if "sha256" not in columns:
        db.execute("ALTER TABLE saved_flows ADD COLUMN sha256 TEXT")
    for row in db.execute("SELECT * FROM saved_flows WHERE sha256 IS NULL").fetchall():
        db.execute(
            "UPDATE saved_flows SET sha256 = ? WHERE name = ? AND version = ?",
            (record_hash(dict(row)), row["name"], row["version"]),
        )


class SavedFlow(BaseModel):
    name: str
    version: int
    owner: str
    proposal: str | None
    description: str
    technique: str
    calypso_version: str
    specification: str
    created: str
    deleted: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def intact(self) -> bool:
        """Whether the version is as it was saved (its record matches its hash)."""
        return self.sha256 is not None and record_hash(self.model_dump()) == self.sha256

    def checked(self) -> SavedFlow:
        """This version, if intact.

        Raises
        ------
        CatalogueError
            The version was changed in the registry after it was saved.
        """
        if not self.intact:
            raise CatalogueError(
                f"saved flow {self.label} was changed in the registry after it was saved (its "
                f"record no longer matches its SHA-256 {str(self.sha256)[:12]}): refused; "
                "save the specification again as a new version"
            )
        return self


def may_change(identity: Identity, flow: SavedFlow) -> bool:
    """Its owner, or a member of its proposal (staff: any): who may change it, and who
    may see it (`calypso flows list/show/diff`, the portal)."""
    return flow.owner == identity.name or identity.member_of(flow.proposal)


def parse_reference(reference: str) -> tuple[str, int | None]:
    name, _, version = reference.partition("@")
    if version and not version.isdigit():
        raise ConfigurationError(f"{reference}: expected NAME or NAME@VERSION (e.g. tomo@2)")
    return name, int(version) if version else None


class SavedFlows:
    def __init__(self, path: Path) -> None:
        self.path = path
        create_database(
            path,
            _SCHEMA,
            CatalogueError,
            "the flow registry",
            "it lives in the catalogue's file: set CALYPSO_CATALOGUE__PATH to a writable file",
            _migrate,
            name="saved flows",
            version=2,
        )

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A connection to change the registry: a file this account cannot write (another
        account's, or the service's) is one line, not sqlite's traceback."""
        try:
            with connect(self.path) as db:
                yield db
        except sqlite3.OperationalError as exc:
            if claims.busy_or_full(str(exc)):
                raise CatalogueError(claims.problem(self.path, exc)) from None
            raise CatalogueError(
                f"the flow registry {self.path} cannot be changed by this account ({exc}): it "
                "is kept by whoever set it up (the service: save through the portal), or set "
                "CALYPSO_CATALOGUE__PATH to a file of your own"
            ) from None

    def save(
        self,
        name: str,
        specification: str,
        technique: str,
        identity: Identity,
        proposal: str | None,
        description: str,
    ) -> SavedFlow:
        """Add a version of ``name``, owned by ``identity``.

        Raises
        ------
        AccessError
            ``identity`` is not a member of ``proposal``, or ``name`` is someone else's.
        """
        if not _NAME.fullmatch(name) or name == ANY_SAVED_FLOW:
            raise ConfigurationError(
                f"flow name {name!r}: expected letters, digits, '.', '_' or '-' (at most 63, "
                f"starting with a letter or digit; not {ANY_SAVED_FLOW!r}), e.g. tomo-sweep"
            )
        if proposal is not None and not identity.member_of(proposal):
            raise AccessError(
                f"refused: {identity.name} is not a member of proposal {proposal} (their "
                f"proposals: {identity.describe_proposals()}): a flow is saved for one's own "
                "proposals only"
            )
        with self._writing() as db:
            db.execute("BEGIN IMMEDIATE")
            latest = db.execute(
                "SELECT * FROM saved_flows WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            if latest is not None:
                existing = SavedFlow(**dict(latest))
                if not may_change(identity, existing):
                    raise AccessError(
                        f"refused: flow {name!r} belongs to {existing.owner} (proposal "
                        f"{existing.proposal}): save yours under another name"
                    )
            record = {
                "name": name,
                "version": 1 if latest is None else latest["version"] + 1,
                "owner": identity.name,
                "proposal": proposal,
                "description": description,
                "technique": technique,
                "calypso_version": calypso.__version__,
                "specification": specification,
                "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            record["sha256"] = record_hash(record)
            db.execute(
                f"INSERT INTO saved_flows ({', '.join(record)}) "
                f"VALUES ({', '.join('?' * len(record))})",
                tuple(record.values()),
            )
        return self.get(name, record["version"])

    def get(self, name: str, version: int | None = None) -> SavedFlow:
        query = "SELECT * FROM saved_flows WHERE name = ? AND deleted IS NULL"
        arguments: tuple = (name,)
        if version is not None:
            query, arguments = query + " AND version = ?", (name, version)
        with connect(self.path) as db:
            row = db.execute(query + " ORDER BY version DESC LIMIT 1", arguments).fetchone()
        if row is None:
            which = f"{name}@{version}" if version else name
            raise CatalogueError(f"no saved flow {which} (`calypso flows list`)")
        return SavedFlow(**dict(row)).checked()

    def list(self) -> list[SavedFlow]:
        """Every version not deleted (altered ones too: ``intact`` says which)."""
        with connect(self.path) as db:
            rows = db.execute(
                "SELECT * FROM saved_flows WHERE deleted IS NULL ORDER BY name, version"
            ).fetchall()
        return [SavedFlow(**dict(row)) for row in rows]

    def delete(self, name: str, identity: Identity) -> int:
        """Mark every version of ``name`` deleted (kept for the provenance of results)."""
        flow = self.get(name)
        if not may_change(identity, flow):
            raise AccessError(
                f"refused: flow {name!r} belongs to {flow.owner} (proposal {flow.proposal}): "
                "only they or members of that proposal may delete it"
            )
        with self._writing() as db:
            cursor = db.execute(
                "UPDATE saved_flows SET deleted = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') "
                "WHERE name = ? AND deleted IS NULL",
                (name,),
            )
            return cursor.rowcount
