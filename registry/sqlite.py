"""SQLite files that several Calypso processes share: the catalogue, the flow registry and
the watcher's state. One way to open them (WAL on a local disk, a busy timeout, a warning on
network file systems) and one way to create and migrate them, a byte of ``user_version``
per schema.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from calypso.errors import CalypsoError

log = logging.getLogger(__name__)

# File systems where SQLite's locks (fcntl) and WAL's shared memory cannot be trusted: writers on
# two machines can both think they hold the lock, and WAL needs memory shared on one host.
_NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "fuse.ceph",
        "fuse.sshfs", "sshfs", "glusterfs", "fuse.glusterfs", "beegfs", "afs", "9p",
        "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse", "fuse.juicefs", "davfs", "fuse.davfs2",
    }
)  # fmt: skip

# The saved flows live in the catalogue's file, so one number in PRAGMA user_version could let
# one schema's stamp hide the other's absence: each schema owns one byte of it instead.
SCHEMA_SLOTS = {"catalogue": 0, "saved flows": 1, "watch state": 2}

# Writers wait for each other this long rather than fail at once: a registration takes a
# few ms, so 30 s only runs out when something holds the file stuck.
_BUSY_TIMEOUT_S = 30

_warned: set[Path] = set()  # files already warned about: once per process


def network_filesystem(path: Path, mounts: Path = Path("/proc/mounts")) -> tuple[str, str] | None:
    """(file system type, mount point) if ``path`` is on a network file system, else None;
    its mount is the longest mount point that holds the resolved path."""
    try:
        table = mounts.read_text()
    except OSError:  # not Linux, or no /proc: nothing to say
        return None
    resolved = path.resolve()
    best: tuple[int, str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes spaces, tabs and backslashes in mount points as octal escapes
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if resolved.is_relative_to(point) and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2], point)
    if best is None:
        return None
    _, kind, point = best
    return (kind, point) if kind in _NETWORK_FILESYSTEMS else None


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to an SQLite file several processes share: one transaction, closed
    at the end; rows readable by column name."""
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
    db.row_factory = sqlite3.Row
    try:
        # Under WAL, NORMAL syncs at checkpoints only: a power cut may lose the latest
        # commits but never corrupts; under a rollback journal keep the default (FULL).
        if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            db.execute("PRAGMA synchronous = NORMAL")
        with db:
            yield db
    finally:
        db.close()


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one, since executescript would commit the
    transaction that keeps two processes from migrating the same file at once."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        yield statement


def _journal(db: sqlite3.Connection, path: Path, what: str, setting: str) -> None:
    """WAL (readers never wait for the writer) on a local disk; on a network file system
    keep the rollback journal, and say so once."""
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    network = network_filesystem(path.parent)
    if network is None:
        # Set once: the mode is kept in the file. Processes opening a new file together all
        # try; SQLite fails the losers at once ("database is locked", no busy wait, as the
        # waits could deadlock), so retry until one of us (or another process) has done it.
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while mode != "wal":
            try:
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))  # jitter: not all again at once
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        return
    if mode == "wal":  # e.g. a file copied from a local disk
        # Another process may have it open: then it is left for the next time.
        with suppress(sqlite3.OperationalError):
            db.execute("PRAGMA journal_mode = DELETE")
    resolved = path.resolve()
    if resolved not in _warned:
        _warned.add(resolved)
        kind, point = network
        log.warning(
            "%s %s is on a network file system (%s at %s), where SQLite's locking and WAL "
            "are unsafe: Calypso keeps the rollback journal, but concurrent writers may still "
            "corrupt it; set %s to a local disk",
            what,
            path,
            kind,
            point,
            setting,
        )


def create_database(
    path: Path,
    schema: str,
    error: type[CalypsoError],
    what: str,
    advice: str,
    migrate: Callable[[sqlite3.Connection], None] | None = None,
    *,
    name: str,
    version: int = 1,
    setting: str = "CALYPSO_CATALOGUE__PATH",
) -> None:
    """Create ``path`` (and its folder) with ``schema`` if needed, then ``migrate`` it, once
    per schema ``version`` (stamped in the byte of PRAGMA user_version that SCHEMA_SLOTS gives
    ``name``); a file that cannot be made or read raises ``error``: "cannot open <what>
    <path>: <why>; <advice>". ``setting`` is the one to point at a local disk."""
    shift = 8 * SCHEMA_SLOTS[name]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A new file is the account's alone, whatever the umask (it holds every proposal's
        # parameters, the ICAT outbox): SQLite gives its -wal and -shm files its mode. A
        # file that is there keeps the mode it was given (a catalogue shared on purpose).
        with suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        # No implicit transactions: this one is taken and committed by hand below.
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            _journal(db, path, what, setting)
            # The usual case, every constructor: one read of the file's header.
            if (db.execute("PRAGMA user_version").fetchone()[0] >> shift) & 0xFF >= version:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                stamp = db.execute("PRAGMA user_version").fetchone()[0]
                if (stamp >> shift) & 0xFF < version:  # nobody did it while we waited
                    for statement in _statements(schema):
                        db.execute(statement)
                    if migrate is not None:
                        migrate(db)
                    stamp = (stamp & ~(0xFF << shift)) | (version << shift)
                    db.execute(f"PRAGMA user_version = {stamp}")
                db.execute("COMMIT")
            except BaseException:
                # Not once it has committed: a Ctrl-C on COMMIT's return became "cannot
                # rollback - no transaction is active", reported as a file that won't open.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            db.close()
    except (OSError, sqlite3.Error) as exc:
        raise error(f"cannot open {what} {path}: {exc}; {advice}") from None
