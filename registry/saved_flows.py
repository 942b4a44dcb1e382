"""Saved user flows: immutable, versioned specifications in the catalogue's database.

Each ``save`` of a name adds a version (1, 2, ...) with its owner, proposal,
description and the Calypso version; versions are never changed. Saving a new
version of a name, or deleting it, is for its owner or a member of its proposal.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

import calypso
from calypso.errors import CatalogueError, ConfigurationError
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
    PRIMARY KEY (name, version)
);
"""


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

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class User(BaseModel):
    """Who acts, and the proposals they belong to (from settings or the facility)."""

    name: str
    proposals: list[str] = []

    def may_change(self, flow: SavedFlow) -> bool:
        return flow.owner == self.name or (
            flow.proposal is not None and flow.proposal in self.proposals
        )


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
            name="saved flows",
        )

    def save(
        self,
        name: str,
        specification: str,
        technique: str,
        user: User,
        proposal: str | None,
        description: str,
    ) -> SavedFlow:
        if not _NAME.fullmatch(name) or name == ANY_SAVED_FLOW:
            raise ConfigurationError(
                f"flow name {name!r}: expected letters, digits, '.', '_' or '-' (at most 63, "
                f"starting with a letter or digit; not {ANY_SAVED_FLOW!r}), e.g. tomo-sweep"
            )
        with connect(self.path) as db:
            db.execute("BEGIN IMMEDIATE")
            latest = db.execute(
                "SELECT * FROM saved_flows WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            if latest is not None:
                existing = SavedFlow(**dict(latest))
                if not user.may_change(existing):
                    raise CatalogueError(
                        f"flow {name!r} belongs to {existing.owner} (proposal "
                        f"{existing.proposal}): save yours under another name"
                    )
            version = 1 if latest is None else latest["version"] + 1
            db.execute(
                "INSERT INTO saved_flows (name, version, owner, proposal, description, technique,"
                " calypso_version, specification) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    user.name,
                    proposal,
                    description,
                    technique,
                    calypso.__version__,
                    specification,
                ),
            )
        return self.get(name, version)

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
        return SavedFlow(**dict(row))

    def list(self) -> list[SavedFlow]:
        with connect(self.path) as db:
            rows = db.execute(
                "SELECT * FROM saved_flows WHERE deleted IS NULL ORDER BY name, version"
            ).fetchall()
        return [SavedFlow(**dict(row)) for row in rows]

    def delete(self, name: str, user: User) -> int:
        """Mark every version of ``name`` deleted (kept for the provenance of results)."""
        flow = self.get(name)
        if not user.may_change(flow):
            raise CatalogueError(
                f"flow {name!r} belongs to {flow.owner} (proposal {flow.proposal}): only they "
                "or members of that proposal may delete it"
            )
        with connect(self.path) as db:
            cursor = db.execute(
                "UPDATE saved_flows SET deleted = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') "
                "WHERE name = ? AND deleted IS NULL",
                (name,),
            )
            return cursor.rowcount
