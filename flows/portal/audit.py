"""What users did in the portal (who, when, what, on which proposal, and how it ended),
one row an action in the catalogue's file (``settings.catalogue_path``), next to the
records of the results those actions made.

The table is created where it is first needed (``CREATE TABLE IF NOT EXISTS``): the
catalogue's own schema and its version stamp are left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from calypso.registry.sqlite import connect

if TYPE_CHECKING:
    from calypso.registry.access import Identity
    from calypso.settings import CalypsoSettings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS portal_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    proposal TEXT,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT 'ok'
)
"""


def record(
    settings: CalypsoSettings,
    identity: Identity,
    action: str,
    *,
    proposal: str | None = None,
    target: str = "",
    detail: str = "",
    outcome: str = "ok",
) -> int:
    """Record one action; its id."""
    settings.catalogue_path.parent.mkdir(parents=True, exist_ok=True)
    with connect(settings.catalogue_path) as db:
        db.execute(_SCHEMA)
        cursor = db.execute(
            "INSERT INTO portal_actions (who, source, action, proposal, target, detail, outcome)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (identity.name, identity.source, action, proposal, target, detail, outcome),
        )
        return int(cursor.lastrowid or 0)


def settle(settings: CalypsoSettings, action_id: int, outcome: str, detail: str = "") -> None:
    """How an action that went on in the background ended (a run, an export)."""
    with connect(settings.catalogue_path) as db:
        db.execute(
            "UPDATE portal_actions SET outcome = ?, detail = CASE WHEN ? = '' THEN detail "
            "ELSE ? END WHERE id = ?",
            (outcome, detail, detail, action_id),
        )


def actions(
    settings: CalypsoSettings, who: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The latest actions, newest first (of ``who`` only, when given)."""
    if not settings.catalogue_path.exists():
        return []
    with connect(settings.catalogue_path) as db:
        db.execute(_SCHEMA)
        where, values = ("WHERE who = ?", [who]) if who else ("", [])
        rows = db.execute(
            f"SELECT * FROM portal_actions {where} ORDER BY id DESC LIMIT ?", [*values, limit]
        ).fetchall()
    return [dict(row) for row in rows]
