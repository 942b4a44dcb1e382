"""The outbox: what Calypso owes an external catalogue (ICAT, its e-logbook), kept in the
catalogue's file until the receiver confirms it (see :mod:`calypso.registry.icat` and
:mod:`calypso.registry.elogbook`)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field


def owe(
    db: sqlite3.Connection,
    record_id: int,
    destination: str,
    payload: dict[str, Any],
    key: str | None = None,
) -> bool:
    """Put ``payload`` for ``destination`` in the outbox, in ``db``'s transaction; False if
    the same ``key`` (by default one per record and destination) is already there."""
    cursor = db.execute(
        "INSERT OR IGNORE INTO outbox (record_id, destination, key, payload, message_id) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            record_id,
            destination,
            key or f"{destination}:{record_id}",
            json.dumps(payload, default=str),
            message_id(),
        ),
    )
    return cursor.rowcount == 1


def replace_payload(
    db: sqlite3.Connection, entry_id: int, payload: dict[str, Any], state: str
) -> None:
    """Replace the payload of an entry in ``state`` (a delivered post's image bytes go:
    the catalogue need not keep what the receiver has)."""
    db.execute(
        "UPDATE outbox SET payload = ? WHERE id = ? AND state = ?",
        (json.dumps(payload, default=str), entry_id, state),
    )


def message_id() -> str:
    """A new outbox entry's message id: hex only (no ':', which some brokers mis-split)."""
    return f"calypso-{uuid.uuid4().hex}"


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
    message_id: str | None = Field(None, description="Names the message on every attempt.")
    lease_owner: str | None = Field(None, description="The sender that may send it now.")
    lease_until: float | None = Field(None, description="Until when (epoch s) it may.")
