"""A new home's Prefect database, copied from one that Prefect migrated once.

Prefect's server makes a missing SQLite database by running every Alembic migration of
its version, 116 for Prefect 3.9, each committed on its own: 3-6 s of wall time (2.7 CPU-s)
added to the first command of every new home on a 2-core machine. A visitor's account at a
beamline is often new, so that first command is the one they see. The outcome is the same
empty schema every time for one Prefect version. ``make install`` (or
``python -m calypso.flows.prefect_database``) therefore has Prefect migrate one database
once, into the environment, as ``<sys.prefix>/share/calypso/prefect-<version>.db``, with
Calypso's result-storage block saved in it. A server about to make a new database copies
that template instead.

A database at the template's revision has nothing to migrate: Calypso's own server
process then skips Prefect's check (:func:`at_head`, ~0.1 s of its start); at any other
revision Prefect checks it and applies what it lacks. Without a template, or with any
database but a local SQLite file (PostgreSQL, in memory), nothing changes: Prefect
migrates as before.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

TEMPLATES = Path(sys.prefix) / "share" / "calypso"


def template_path() -> Path:
    """Where this environment's template for its Prefect version is (or would be)."""
    return TEMPLATES / f"prefect-{version('prefect')}.db"


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite database URL (``sqlite+aiosqlite:///PATH``); None for any
    other database, and for one in memory."""
    scheme, _, rest = url.partition("://")
    if not scheme.startswith("sqlite") or not rest.startswith("/"):
        return None
    path, _, query = rest[1:].partition("?")
    if not path or "memory" in path or "mode=memory" in query:
        return None
    return Path(path)


def provide_configured() -> Path | None:
    """:func:`provide` the database Prefect's settings name now (its home's ``prefect.db``
    by default); its file, None for another database."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    if url is None:
        return None
    database = sqlite_file(url.get_secret_value() if hasattr(url, "get_secret_value") else url)
    if database is not None:
        provide(database, make_folder=database.parent == Path(settings.home))
    return database


def revision(database: Path, immutable: bool = False) -> str | None:
    """The Alembic revision an SQLite database is at (read only; ``immutable``: a file
    nothing writes, read without locks); None for a file that is no such database."""
    options = "mode=ro&immutable=1" if immutable else "mode=ro"
    try:
        uri = f"{database.resolve().as_uri()}?{options}"  # any character of the path quoted
        with closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    return rows[0][0] if len(rows) == 1 else None


def at_head(database: Path) -> bool:
    """Whether ``database`` is at the revision this Prefect's migrations end at: the
    template's, which they made. Prefect's own check at a server's start then has nothing
    to do, and costs ~0.1 s (Alembic reading its 116 scripts) while a command waits."""
    template = template_path()
    if not template.is_file() or not database.is_file():
        return False
    head = revision(template, immutable=True)
    return head is not None and revision(database) == head


def provide(database: Path, make_folder: bool = False) -> bool:
    """Copy the template to ``database`` if ``database`` does not exist yet and there is
    a template; whether it did. Its folder is made only with ``make_folder`` (Prefect's
    home, which Prefect makes too); elsewhere a missing folder stays Prefect's to report.
    Never over a database that appeared meanwhile: the copy is linked into place, which
    fails if the name is taken."""
    template = template_path()
    if database.exists() or not template.is_file():
        return False
    try:
        if make_folder:
            database.parent.mkdir(parents=True, exist_ok=True)
        # Owner only (mkstemp's mode): the database will hold the runs' parameters and logs.
        handle, name = tempfile.mkstemp(prefix=f".{database.name}.", dir=database.parent)
    except OSError:
        return False  # Prefect makes it, or says why it cannot
    staged = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, template.open("rb") as source:
            shutil.copyfileobj(source, out)
        os.link(staged, database)
    except OSError:  # taken meanwhile (FileExistsError), a template it cannot read, ...
        return False
    finally:
        staged.unlink(missing_ok=True)
    return True


def make_template() -> Path:
    """Have Prefect migrate an empty database (``prefect server database upgrade``), save
    Calypso's result-storage block in it through a Prefect server, and keep a consistent
    copy as this environment's template."""
    template = template_path()
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        migrated = Path(scratch) / "prefect.db"
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_API_", "PREFECT_SERVER_"))  # another server's
        }
        environment.update(
            PREFECT_HOME=scratch,
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{migrated}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # Prefect's own block types are registered by the servers that show a UI.
            PREFECT_API_BLOCKS_REGISTER_ON_START="false",
        )
        prefect = Path(sys.executable).with_name("prefect")
        upgrade = [str(prefect), "server", "database", "upgrade", "--yes"]
        subprocess.run(upgrade, env=environment, check=True, stdout=subprocess.DEVNULL)
        _save_result_block(environment)
        staged = template.with_name(f".{template.name}.{os.getpid()}")
        # sqlite's backup: one self-contained file, whatever the journal left beside it.
        source, copy = sqlite3.connect(migrated), sqlite3.connect(staged)
        try:
            source.backup(copy)
            # No write-ahead log: reading it then leaves no files beside it (Prefect turns
            # the log on again in each copy it opens).
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            source.close()
            copy.close()
        os.replace(staged, template)
    return template


def _save_result_block(environment: dict[str, str]) -> None:
    """The block every run's chunk tasks keep their results with
    (:func:`calypso.tasks.caching.save_result_block`), saved in the template: a first run
    saving it raced the run's other writes in SQLite about half the time ("database is
    locked", answered 503) and waited Prefect's client's 2 s before it tried again."""
    from calypso.executors.kept import prefect_started
    from calypso.flows import prefect_server

    port = prefect_server.free_port()
    server = prefect_server.start(port, environment)
    try:
        url = prefect_server.api_url(port)
        if not prefect_started(server, url, None, 120):
            raise RuntimeError(f"Prefect's server on {url} did not start")
        save = "from calypso.tasks.caching import save_result_block; save_result_block()"
        subprocess.run(
            [sys.executable, "-c", save], env={**environment, "PREFECT_API_URL": url}, check=True
        )
    finally:
        prefect_server.stop(server, 10)  # and waited for: the database closed


if __name__ == "__main__":
    # `make install`: made once per Prefect version (--if-missing); by hand, made anew.
    if "--if-missing" not in sys.argv[1:] or not template_path().is_file():
        print(f"Prefect database template: {make_template()}")
