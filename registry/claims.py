"""Who processes an acquisition, and where its results go: leases held by live flow runs.

A flow run started by an acquisition event *claims* the event's processing key, and
every flow run *reserves* its catalogue record (status ``running``) in the first version
of its output folder that nobody holds, before it works. Both are leases: the run's
heartbeat (:mod:`calypso.registry.heartbeat`) renews them every quarter of
``catalogue.lease_s``. A run killed or vanished stops renewing them; once its lease has
run out (or the Prefect API says the run is over), the next run for the same key takes
the claim over, and the acquisition is processed again, once.

A record goes ``running`` -> ``publishing`` (its results being renamed into place) ->
``completed``, which marks its claim ``done`` in the same transaction, or ``failed``,
which frees the claim. A version's folder (``<folder>``, then ``<folder>_v2`` ...) is
never given to another run while a completed, publishing or live running record holds it
for the same result file: a rerun writes beside the older results, whose record stays true.

A run that died holds nothing once its lease has run out: the next run to reserve its
folder marks its record failed and removes its part folder, and, when it died while
publishing, the files it had renamed into place that still have the checksums its record
gives (its own): the folder is then the next run's, and the acquisition is published
once, with its record. A file changed since keeps the folder held.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import CalypsoError, CatalogueError
from calypso.registry import sqlite as shared_sqlite
from calypso.registry.leftovers import release, remove_part_folder

if TYPE_CHECKING:
    from calypso.registry.catalogue import ProcessedDataset, SQLiteCatalogue

LEASE_S = 120.0  # the default of CALYPSO_CATALOGUE__LEASE_S
_HOLDING = ("running", "publishing", "completed")  # statuses that hold a version's folder


def canonical(path: str | Path) -> str:
    """The one spelling of a path (absolute, symlinks and ``..`` resolved), for keys and
    records: two watchers reaching a dataset through different spellings agree."""
    return os.path.realpath(os.path.expanduser(str(path)))


def canonical_url(url: str) -> str:
    """A NeXus URL (``file::/path``) with its file spelled canonically."""
    file, separator, inside = url.partition("::")
    return canonical(file) + separator + inside


def version_folder(base: str, version: int) -> str:
    """Where version ``version`` of results planned for ``base`` go: ``base`` itself
    first (the paths a first run always had), then ``base_v2``, ``base_v3`` ... beside it."""
    return base if version <= 1 else f"{base}_v{version}"


def version_base(record: ProcessedDataset) -> str:
    """The folder a record's results were planned for (its version's folder, unversioned)."""
    suffix = f"_v{record.version}"
    path = record.processed_path
    return path[: -len(suffix)] if (record.version or 1) > 1 and path.endswith(suffix) else path


# -- errors that say what to do ------------------------------------------------------


def busy_or_full(text: str) -> bool:
    lower = text.lower()
    return any(word in lower for word in ("locked", "busy", "full"))


def problem(path: Path | str, exc: BaseException) -> str:
    """What went wrong writing the catalogue at ``path``, and what to do about it."""
    text = str(exc)
    lower = text.lower()
    if "locked" in lower or "busy" in lower:
        return (
            f"the catalogue {path} is locked: another process has been writing to it for over "
            f"{shared_sqlite._BUSY_TIMEOUT_S} s (`fuser {path}` names it: a stuck calypso "
            "command, or an sqlite3 session left open); end that process"
        )
    if "full" in lower:
        return (
            f"the disk holding the catalogue {path} is full ({text}): free space on it "
            f"(`df {Path(path).parent}`)"
        )
    if "readonly" in lower or "read-only" in lower:
        return (
            f"the catalogue {path} is read-only ({text}): make it writable, or set "
            "CALYPSO_CATALOGUE__PATH to a writable file"
        )
    return f"cannot write to the catalogue {path}: {text}"


@contextmanager
def transaction(catalogue: SQLiteCatalogue) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (BEGIN IMMEDIATE); SQLite's errors become a
    CatalogueError that says what to do."""
    try:
        with catalogue._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            yield db
    except sqlite3.Error as exc:
        raise CatalogueError(problem(catalogue.path, exc)) from None


def migrate(db: sqlite3.Connection) -> None:
    """Catalogues made before leases: new columns; a claim whose run completed is done."""
    added = {
        "processed_datasets": {
            "version": "INTEGER",
            "output_file": "TEXT",
            "key": "TEXT",
            "checksums": "TEXT NOT NULL DEFAULT '{}'",
            "lease_expires": "REAL",
        },
        "claims": {
            "state": "TEXT NOT NULL DEFAULT 'running'",
            "expires": "REAL NOT NULL DEFAULT 0",
            "record_id": "INTEGER",
        },
    }
    for table, columns in added.items():
        present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                if table == "claims" and name == "state":  # older claims: what became of them
                    db.execute(
                        "UPDATE claims SET state = 'done' WHERE flow_run_id IN (SELECT "
                        "flow_run_id FROM processed_datasets WHERE status = 'completed')"
                    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS processed_by_path ON processed_datasets (processed_path)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS processed_by_run ON processed_datasets (flow_run_id)")


# -- claims on processing keys --------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Who processes an acquisition (its processing key)."""

    key: str
    flow_run_id: str
    technique: str
    state: str  # running (leased until ``expires``, epoch s), done or failed
    expires: float
    record_id: int | None = None

    def live(self, now: float | None = None) -> bool:
        return self.state == "running" and self.expires > (time.time() if now is None else now)


def _claim(row: sqlite3.Row) -> Claim:
    return Claim(
        row["key"],
        row["flow_run_id"],
        row["technique"],
        row["state"],
        float(row["expires"] or 0),
        row["record_id"],
    )


def claim(
    catalogue: SQLiteCatalogue,
    key: str,
    run_id: str,
    technique: str,
    lease_s: float,
    take_from: str | None = None,
) -> tuple[bool, Claim | None]:
    """Claim ``key`` for flow run ``run_id`` for ``lease_s`` seconds: (taken, the claim found
    before, None if none). Taken when there was none, when it is the run's own (a retry),
    when its holder failed, or its lease ran out (the holder was killed or vanished), or
    its holder is ``take_from`` (the Prefect API says that run is over). Not taken when
    done (processed already) or held by a live run."""
    now = time.time()
    with transaction(catalogue) as db:
        row = db.execute("SELECT * FROM claims WHERE key = ?", (key,)).fetchone()
        before = None if row is None else _claim(row)
        if before is None:
            db.execute(
                "INSERT INTO claims (key, flow_run_id, technique, state, expires) "
                "VALUES (?, ?, ?, 'running', ?)",
                (key, run_id, technique, now + lease_s),
            )
            return True, None
        if before.flow_run_id == run_id:
            if before.state != "done":  # a retry, or another variant of a sweep
                db.execute(
                    "UPDATE claims SET state = 'running', expires = ? WHERE key = ?",
                    (now + lease_s, key),
                )
            return True, before
        if before.state == "done" or (before.live(now) and before.flow_run_id != take_from):
            return False, before
        db.execute(
            "UPDATE claims SET flow_run_id = ?, technique = ?, state = 'running', expires = ?, "
            "record_id = NULL WHERE key = ?",
            (run_id, technique, now + lease_s, key),
        )
        return True, before


def processing_claim(catalogue: SQLiteCatalogue, key: str) -> Claim | None:
    with catalogue._connect() as db:
        row = db.execute("SELECT * FROM claims WHERE key = ?", (key,)).fetchone()
    return None if row is None else _claim(row)


# -- reserved records and versions ------------------------------------------------------


def _values(record: ProcessedDataset) -> dict[str, Any]:
    from calypso.registry.catalogue import _JSON_FIELDS

    values = record.model_dump(exclude={"id"})
    for name in _JSON_FIELDS:
        values[name] = json.dumps(values[name], default=str)
    return values


def _same_result(planned: str | None, other: str | None) -> bool:
    """Whether two records' results would collide (unknown: they might)."""
    return not planned or not other or Path(planned).name == Path(other).name


def folders_of(catalogue: SQLiteCatalogue, run_id: str) -> list[str]:
    """The folders flow run ``run_id`` reserved records in (a run's versions)."""
    with catalogue._connect() as db:
        rows = db.execute(
            "SELECT DISTINCT processed_path FROM processed_datasets WHERE flow_run_id = ?",
            (run_id,),
        ).fetchall()
    return [row["processed_path"] for row in rows if row["processed_path"]]


def _taken(
    db: sqlite3.Connection,
    folder: str,
    planned: str | None,
    run_id: str,
    now: float,
    dead: str | None = None,
) -> bool:
    """Whether ``folder`` is held for the result file ``planned``. A reservation whose
    lease ran out, or whose run is ``dead`` (its claim was taken over), is marked failed
    and holds nothing once none of its published files is left, its part folder removed
    (:func:`~calypso.registry.leftovers.release`)."""
    holders = db.execute(
        "SELECT id, status, lease_expires, output_file, flow_run_id, checksums FROM "
        f"processed_datasets WHERE processed_path = ? AND status IN {_HOLDING}",
        (folder,),
    ).fetchall()
    taken = False
    for holder in holders:
        if not _same_result(planned, holder["output_file"]):
            continue
        stale = holder["status"] != "completed" and (
            (holder["lease_expires"] or 0) <= now or holder["flow_run_id"] == dead
        )
        if stale and release(db, holder, folder, f"flow run {run_id} took its folder"):
            continue
        if holder["status"] == "completed":  # killed after its record, before its cleanup
            remove_part_folder(folder, holder["flow_run_id"])
        taken = True
    return taken or _in_the_way(folder, planned)


def _in_the_way(folder: str, planned: str | None) -> bool:
    """Whether files no record here holds are where the result would go: the result file
    planned or a sibling of it (``<stem>.png`` ...), or, the result unknown, anything. A
    result of another catalogue (another account's home, the catalogue started afresh),
    a user's own file in an ``--output`` folder or another program's were replaced
    without a word. A dead run's part folder and a live run's partial file are a run's
    own (taken over by the next run)."""
    from calypso.tasks.writers.publication import PARTIAL_PREFIX

    try:
        names = [
            name
            for name in os.listdir(folder)
            if not name.startswith(PARTIAL_PREFIX) and not name.endswith(".partial.h5")
        ]
    except OSError:  # not there yet (or not ours to list: the run's own check says so)
        return False
    if not planned:
        return bool(names)
    result = Path(planned)
    return any(name == result.name or name.startswith(f"{result.stem}.") for name in names)


@dataclass(frozen=True)
class Released:
    """The record of a run that died holding it, released (:func:`release_dead`)."""

    record_id: int
    flow_run_id: str
    folder: str
    message: str


def release_dead(
    catalogue: SQLiteCatalogue,
    folders: Collection[str] | None = None,
    now: float | None = None,
    dry_run: bool = False,
    grace_s: float = 0.0,
) -> list[Released]:
    """Release what runs that died hold (records ``running`` or ``publishing`` whose lease
    ran out: the process was killed, crashed or its machine went away), in ``folders`` or
    everywhere: each record is marked failed as :func:`reserve` does when another run
    takes its folder (a dead publication's files removed, its part folder too); its claim
    stays as it is (a lease run out: the watcher posts the acquisition again, the next run
    takes it over). Without this, such a record waits for the next run of the
    same folder (a rerun that came while its lease still ran went to the next version).
    ``dry_run``: only which records are dead (nothing changes). ``grace_s``: how long past
    its lease a record must be (a live run's heartbeat starved by a loaded machine is
    not taken for dead)."""
    now = time.time() if now is None else now
    released = []
    with transaction(catalogue) as db:
        holders = db.execute(
            "SELECT id, status, lease_expires, output_file, flow_run_id, checksums, "
            "processed_path FROM processed_datasets WHERE status IN ('running', 'publishing') "
            "AND COALESCE(lease_expires, 0) <= ? ORDER BY id",
            (now - grace_s,),
        ).fetchall()
        for holder in holders:
            folder = holder["processed_path"]
            if folders is not None and folder not in folders:
                continue
            if dry_run:
                released.append(Released(holder["id"], holder["flow_run_id"] or "", folder, ""))
                continue
            try:
                message = release(db, holder, folder, "its lease ran out and it was released")
            except (OSError, CalypsoError):  # a folder this process may not touch: others
                continue
            if not message:
                continue
            released.append(Released(holder["id"], holder["flow_run_id"] or "", folder, message))
    return released


def reserve(
    catalogue: SQLiteCatalogue,
    record: ProcessedDataset,
    lease_s: float,
    dead: str | None = None,
) -> ProcessedDataset:
    """Reserve the record of a run about to work (``running``, leased for ``lease_s``), in
    the first version of its folder (``record.processed_path``) nobody holds for its result
    file (the reservations of ``dead``, a run whose claim was taken over, hold nothing); a
    retry of the same flow run takes back its own. The record is returned with its id,
    version and folder."""
    base, planned = record.processed_path, record.output_file
    now = time.time()
    with transaction(catalogue) as db:
        if record.flow_run_id:  # a retry of the same flow run: the same folder
            for own in db.execute(
                "SELECT id, processed_path, version, output_file FROM processed_datasets "
                "WHERE flow_run_id = ? AND technique = ? AND status IN "
                "('running', 'publishing', 'failed') ORDER BY id DESC",
                (record.flow_run_id, record.technique),
            ).fetchall():
                version = own["version"] or 1
                if own["processed_path"] == version_folder(base, version) and (
                    _same_result(planned, own["output_file"])
                ):
                    db.execute(
                        "UPDATE processed_datasets SET status = 'running', message = NULL, "
                        "lease_expires = ? WHERE id = ?",
                        (now + lease_s, own["id"]),
                    )
                    folder = own["processed_path"]
                    return record.model_copy(
                        update={"id": own["id"], "version": version, "processed_path": folder}
                    )
        version = 1
        run_id = record.flow_run_id or ""
        while _taken(db, version_folder(base, version), planned, run_id, now, dead):
            version += 1
        reserved = record.model_copy(
            update={
                "status": "running",
                "version": version,
                "processed_path": version_folder(base, version),
            }
        )
        values = _values(reserved) | {"lease_expires": now + lease_s}
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        cursor = db.execute(f"INSERT INTO processed_datasets ({columns}) VALUES ({marks})", values)
        return reserved.model_copy(update={"id": int(cursor.lastrowid)})


def _require_held(db: sqlite3.Connection, record_id: int, run_id: str, key: str | None) -> None:
    row = db.execute(
        "SELECT status, flow_run_id, message FROM processed_datasets WHERE id = ?", (record_id,)
    ).fetchone()
    if row is None or row["flow_run_id"] != run_id or row["status"] not in _HOLDING[:2]:
        why = row["message"] if row is not None and row["message"] else "it is no longer held"
        raise CatalogueError(f"flow run {run_id} lost its reserved record {record_id}: {why}")
    if key:
        holder = db.execute("SELECT flow_run_id FROM claims WHERE key = ?", (key,)).fetchone()
        if holder is None or holder["flow_run_id"] != run_id:
            taker = holder["flow_run_id"] if holder is not None else "nobody"
            raise CatalogueError(
                f"flow run {run_id} lost its claim on this acquisition to flow run {taker} "
                "(no heartbeat within its lease: the run was thought dead)"
            )


def publishing(
    catalogue: SQLiteCatalogue,
    record_id: int,
    run_id: str,
    key: str | None,
    lease_s: float,
    checksums: dict[str, str],
) -> None:
    """Mark a reserved record ``publishing``, with the files about to be renamed into
    place; refused (CatalogueError) if the run no longer holds its record or claim."""
    with transaction(catalogue) as db:
        _require_held(db, record_id, run_id, key)
        db.execute(
            "UPDATE processed_datasets SET status = 'publishing', checksums = ?, "
            "lease_expires = ? WHERE id = ?",
            (json.dumps(checksums), time.time() + lease_s, record_id),
        )


def complete(
    catalogue: SQLiteCatalogue,
    record: ProcessedDataset,
    owed: list[tuple[str, dict[str, Any]]] = (),
) -> int:
    """Complete (or fail) a reserved record with ``record``, mark its claim done (or free
    it) and put the entries ``owed`` in the outbox: one transaction."""
    from calypso.registry.outbox import owe

    values = _values(record)
    assignments = ", ".join(f"{name} = :{name}" for name in values)
    with transaction(catalogue) as db:
        row = db.execute(
            "SELECT status FROM processed_datasets WHERE id = ?", (record.id,)
        ).fetchone()
        if row is not None and row["status"] == record.status:
            return int(record.id)  # a retry of the same registration
        if record.status == "completed":
            _require_held(db, int(record.id), record.flow_run_id or "", record.key)
        elif row is None or row["status"] not in _HOLDING[:2]:
            return int(record.id)  # a failure, after the reservation went to another run
        db.execute(
            f"UPDATE processed_datasets SET {assignments}, lease_expires = NULL WHERE id = :id",
            values | {"id": record.id},
        )
        if record.key:
            state = "done" if record.status == "completed" else "failed"
            db.execute(
                "UPDATE claims SET state = ?, expires = 0, record_id = ? "
                "WHERE key = ? AND flow_run_id = ? AND state != 'done'",
                (state, record.id, record.key, record.flow_run_id),
            )
        for destination, payload in owed if record.status == "completed" else ():
            owe(db, record.id, destination, payload)
        return int(record.id)
