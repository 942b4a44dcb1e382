"""A new home's Prefect database, copied from the environment's template that Prefect
migrated and Calypso's result-storage block was saved in (flows/prefect_database.py), and
a real server that starts on the copy."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from calypso.flows import prefect_database, prefect_server
from calypso.tasks.caching import RESULTS_BLOCK
from tests.processes import wait_until


def test_only_a_local_sqlite_file_gets_the_template():
    assert prefect_database.sqlite_file("sqlite+aiosqlite:////home/u/.prefect/prefect.db") == Path(
        "/home/u/.prefect/prefect.db"
    )
    assert prefect_database.sqlite_file("postgresql+asyncpg://u:p@db:5432/prefect") is None
    memory = "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true&check_same_thread=false"
    assert prefect_database.sqlite_file(memory) is None
    # relative to the server's folder, as Prefect reads it
    assert prefect_database.sqlite_file("sqlite:///prefect.db") == Path("prefect.db")


def test_the_template_is_copied_only_where_there_is_no_database(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(prefect_database, "TEMPLATES", tmp_path / "templates")
    database = tmp_path / "home" / "prefect.db"
    assert not prefect_database.provide(database)  # no template: Prefect migrates
    assert not database.exists()

    template = prefect_database.template_path()
    template.parent.mkdir()
    template.write_bytes(b"the migrated schema")
    # A folder that does not exist is Prefect's to report ("unable to open database file"),
    # but its own home, which it makes anyway.
    assert not prefect_database.provide(database)
    assert not database.parent.exists()
    assert prefect_database.provide(database, make_folder=True)
    assert database.read_bytes() == b"the migrated schema"
    assert database.stat().st_mode & 0o777 == 0o600  # it will hold the runs: owner only

    database.write_bytes(b"a home's runs")
    assert not prefect_database.provide(database)
    assert database.read_bytes() == b"a home's runs"  # never over a database
    assert list(database.parent.iterdir()) == [database]  # nothing staged left beside it

    def no_hard_links(*_):  # a file system without them
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(prefect_database.os, "link", no_hard_links)
    assert not prefect_database.provide(tmp_path / "other" / "prefect.db", make_folder=True)
    assert list((tmp_path / "other").iterdir()) == []  # Prefect makes it, as before


def test_a_database_is_at_head_only_at_the_templates_revision(tmp_path: Path, monkeypatch):
    """A server skips Prefect's migration check (~0.1 s of its start) only on a database at
    the revision of the template, which this Prefect's own migrations made."""
    monkeypatch.setattr(prefect_database, "TEMPLATES", tmp_path / "templates")
    template = prefect_database.template_path()
    template.parent.mkdir()

    def database_at(path: Path, revision: str) -> Path:
        path.parent.mkdir(exist_ok=True)
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
            db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
        return path

    home = database_at(tmp_path / "a home #1?" / "prefect.db", "27d8f4e1a6c9")
    assert not prefect_database.at_head(home)  # no template: Prefect checks
    database_at(template, "27d8f4e1a6c9")
    assert prefect_database.at_head(home)
    assert prefect_database.revision(home) == "27d8f4e1a6c9"
    older = database_at(tmp_path / "older.db", "a1b2c3d4e5f6")  # made by an older Prefect
    assert not prefect_database.at_head(older)
    (tmp_path / "not-a-database.db").write_text("runs")
    assert not prefect_database.at_head(tmp_path / "not-a-database.db")
    assert not prefect_database.at_head(tmp_path / "missing.db")


def sqlite_head_revision() -> str:
    """The revision Prefect's own SQLite migrations end at."""
    import prefect.server.database
    from alembic.script import ScriptDirectory

    migrations = Path(prefect.server.database.__file__).parent / "_migrations"
    scripts = ScriptDirectory(
        str(migrations), version_locations=[str(migrations / "versions" / "sqlite")]
    )
    return scripts.get_current_head()


@pytest.mark.slow
def test_a_new_home_starts_from_prefects_own_migrated_schema(tmp_path: Path):
    template = prefect_database.template_path()
    if not template.is_file():  # made by `make install`; here if the tests run without it
        prefect_database.make_template()
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (sqlite_head_revision(),)
        ]
        # and the block every run keeps its chunks' results with: no first run saves it
        assert db.execute("SELECT name FROM block_document").fetchall() == [(RESULTS_BLOCK,)]

    home = tmp_path / "prefect"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_API_DATABASE", "PREFECT_SERVER_DATABASE", "PREFECT_API"))
    }
    env["PREFECT_HOME"] = str(home)
    port = prefect_server.free_port()
    server = prefect_server.start(port, env)
    try:

        def created_flow() -> dict | None:
            request = urllib.request.Request(
                f"{prefect_server.api_url(port)}/flows/",
                data=json.dumps({"name": "a first flow"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as reply:
                    return json.loads(reply.read())
            except OSError:
                assert server.poll() is None, "the server ended"
                return None

        assert wait_until(created_flow, 120, "the server's answer", interval=0.1)["name"] == (
            "a first flow"
        )
    finally:
        prefect_server.stop(server, 10)
    database = home / "prefect.db"
    assert database.stat().st_mode & 0o777 == 0o600  # the copy, not one Prefect made
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT name FROM flow").fetchall() == [("a first flow",)]
        assert db.execute("SELECT name FROM block_document").fetchall() == [(RESULTS_BLOCK,)]
