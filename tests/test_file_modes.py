"""Who may read what a run writes (docs/security.md, "Files"): results get the group of
their proposal folder and the configured modes whatever the umask, never world-writable;
kept chunk results are the owner's only and expire.

Real runs of the CLI on a copy of the sample dataset; the group is a real one (made with
``groupadd`` when the tests run as root, else one of the account's own groups).
"""

from __future__ import annotations

import grp
import os
import shutil
import sqlite3
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from calypso.flows.cli import main
from calypso.registry import SQLiteCatalogue
from calypso.tasks.result_storage import storage as result_storage
from tests.damage import damage_stored_frame


@pytest.fixture(scope="module")
def group() -> Iterator[grp.struct_group]:
    """A group that is not this process's own: the proposal's."""
    if os.geteuid() == 0 and shutil.which("groupadd"):
        name = f"cal{uuid.uuid4().hex[:8]}"
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        try:
            yield grp.getgrnam(name)
        finally:
            subprocess.run(["groupdel", name], capture_output=True)
        return
    others = [g for g in os.getgroups() if g != os.getegid()]
    if not others:
        pytest.skip("not root and a member of no group but its own: no group to give results")
    yield grp.getgrgid(others[0])


@pytest.fixture
def proposal(diffraction_sample, tmp_path, group) -> Path:
    """A copy of the sample dataset in a proposal folder owned by ``group``."""
    raw = diffraction_sample.dataset
    target = tmp_path / "visitor" / raw.raw_dataset_dir.relative_to(raw.root)
    shutil.copytree(raw.raw_dataset_dir, target)
    folder = tmp_path / "visitor" / raw.proposal
    os.chown(folder, -1, group.gr_gid)
    return target


@pytest.fixture
def options(diffraction_sample) -> list[str]:
    poni, mask = diffraction_sample.calibration["poni"], diffraction_sample.calibration["mask"]
    return ["--set", f"poni={poni}", "--set", f"mask={mask}", "--workers", "1"]


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def processed(raw_dataset_dir: Path) -> Path:
    parts = list(raw_dataset_dir.parts)
    parts[parts.index("RAW_DATA")] = "PROCESSED_DATA"
    return Path(*parts)


def modes_under(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``folder`` (itself included): (octal mode, group id)."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        found[str(path.relative_to(folder))] = (f"{stat.S_IMODE(info.st_mode):04o}", info.st_gid)
    return found


def test_results_get_the_proposal_group_and_the_default_modes_whatever_the_umask(
    proposal, options, group, catalogue_path, capsys, tmp_path, monkeypatch
):
    session = processed(proposal).parents[2]  # <proposal>/<beamline>/<session>
    # This run's own kept results (the session's folder holds other tests' runs).
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    storage = result_storage()[0]
    expired = storage / "expired-result"
    expired.parent.mkdir(parents=True, exist_ok=True)
    expired.write_bytes(b"old")
    os.utime(expired, (time.time() - 4 * 86400,) * 2)  # older than the 72 h default
    with umask(0):  # the most open umask: the modes come from the settings, not from it
        status = main(["run", "diffraction", str(proposal), *options])
    assert status == 0, capsys.readouterr().err
    created = modes_under(session / "PROCESSED_DATA")
    files = {n: m for n, m in created.items() if (session / "PROCESSED_DATA" / n).is_file()}
    folders = {n: m for n, m in created.items() if n not in files}
    assert any(n.endswith(".h5") for n in files) and any(n.endswith(".png") for n in files)
    assert set(files.values()) == {("0640", group.gr_gid)}
    assert set(folders.values()) == {("2750", group.gr_gid)}  # set-group-id: later files too
    assert not any(".calypso-partial-" in n for n in created)
    # The raw data and the folders that were there are left as they were.
    assert (proposal / f"{proposal.name}.h5").stat().st_gid != group.gr_gid
    # A run prunes kept chunk results past their age; its own fresh ones are private.
    assert not expired.exists()
    kept = modes_under(storage)
    assert kept["."][0] == "0700"
    assert {mode for name, (mode, _) in kept.items() if (storage / name).is_file()} == {"0600"}


def test_configured_modes_and_group_and_a_failed_runs_part_folder(
    proposal, options, group, catalogue_path, monkeypatch, capsys
):
    own = grp.getgrgid(os.getegid())
    monkeypatch.setenv("CALYPSO_PROCESSED_DATA__FILE_MODE", "0600")
    monkeypatch.setenv("CALYPSO_PROCESSED_DATA__FOLDER_MODE", "0750")
    monkeypatch.setenv("CALYPSO_PROCESSED_DATA__GROUP", own.gr_name)
    with umask(0):
        assert main(["run", "diffraction", str(proposal), *options]) == 0
    results = processed(proposal)
    created = modes_under(results.parent.parent)  # PROCESSED_DATA/<collection>: made by the run
    files = {m for n, m in created.items() if (results.parent.parent / n).is_file()}
    folders = {m for n, m in created.items() if not (results.parent.parent / n).is_file()}
    assert files == {("0600", own.gr_gid)} and folders == {("0750", own.gr_gid)}

    # A failed run keeps its part folder for a retry: the owner's only, its files unseen.
    monkeypatch.delenv("CALYPSO_PROCESSED_DATA__GROUP")
    damage_stored_frame(proposal, 11)  # the last chunk fails, after others are done
    with umask(0):
        status = main(["run", "diffraction", str(proposal), *options, "--set", "chunk_size=4"])
    assert status == 3 and "cannot be read" in capsys.readouterr().err
    [part] = results.glob("*/.calypso-partial-*")  # in the version folder the run took
    assert stat.S_IMODE(part.stat().st_mode) == 0o700
    assert [r.status for r in SQLiteCatalogue(catalogue_path).list()] == ["failed", "completed"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FILE_MODE", "0666", "0666 makes results world-writable (o+w), which Calypso refuses"),
        ("FOLDER_MODE", "2757", "2757 makes results world-writable (o+w)"),
        ("FILE_MODE", "4640", "no set-user-id, set-group-id or sticky bit on result files"),
        ("FILE_MODE", "0440", "the owner must be able to read and write (0600) the results"),
        ("FOLDER_MODE", "rwx", "'rwx' is not an octal mode such as '0640'"),
    ],
)
def test_a_world_writable_or_odd_mode_is_refused(
    variable, value, message, proposal, options, monkeypatch, capsys
):
    monkeypatch.setenv(f"CALYPSO_PROCESSED_DATA__{variable}", value)
    assert main(["run", "diffraction", str(proposal), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calypso: error: invalid Calypso settings") and err.count("\n") == 1
    assert f"processed_data.{variable.lower()}" in err and message in err
    assert not processed(proposal).parents[2].joinpath("PROCESSED_DATA").exists()


def test_a_mode_written_as_a_toml_number_is_refused(tmp_path, monkeypatch):
    from calypso.errors import ConfigurationError
    from calypso.settings import load_settings

    config = tmp_path / "config.toml"
    config.write_text("[processed_data]\nfile_mode = 640\n")  # decimal: not what was meant
    monkeypatch.setenv("CALYPSO_CONFIG", str(config))
    with pytest.raises(ConfigurationError, match=r'write the mode as text in octal, e.g. "0640"'):
        load_settings()
    config.write_text('[processed_data]\nfile_mode = "0640"\ngroup = "no-such-group-x"\n')
    assert load_settings().processed_data.file_mode == "0640"


def test_kept_chunk_results_are_private_reused_then_expired(tmp_path, monkeypatch):
    """A task kept as the chunk tasks are: its result is reused by a later run with the
    same inputs, until it is older than the maximum age; its file 0600 in 0700 folders."""
    from prefect import flow, task

    from calypso.tasks.caching import CHUNK_TASK, save_result_block
    from calypso.tasks.result_storage import prune_results

    storage = tmp_path / "results"
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
    monkeypatch.setenv("CALYPSO_SERVE__RESULT_MAX_AGE_H", "1")
    calls = []

    @task(**CHUNK_TASK)
    def chunk(index: int, salt: str) -> int:
        calls.append(index)
        return index * 2

    @flow
    def two_chunks(salt: str) -> list[str]:
        return [chunk(i, salt, return_state=True).name for i in range(2)]

    save_result_block()  # as a flow run does before its chunks
    salt = uuid.uuid4().hex
    with umask(0):
        assert two_chunks(salt) == ["Completed", "Completed"]
    kept = modes_under(storage)
    assert {m for n, (m, _) in kept.items() if (storage / n).is_file()} == {"0600"}
    assert {m for n, (m, _) in kept.items() if (storage / n).is_dir()} == {"0700"}
    assert two_chunks(salt) == ["Cached", "Cached"] and len(calls) == 2
    old = time.time() - 2 * 3600
    for path in storage.rglob("*"):
        os.utime(path, (old, old))
    assert two_chunks(salt) == ["Completed", "Completed"] and len(calls) == 4
    for path in storage.rglob("*"):
        os.utime(path, (old, old))
    (storage / "fresh").write_bytes(b"x")
    assert prune_results() == 2 and [p.name for p in storage.iterdir()] == ["fresh"]


def test_a_new_catalogue_is_the_accounts_alone_whatever_the_umask(tmp_path):
    # It holds every proposal's parameters and the ICAT outbox: a configured path (outside
    # the 0700 home) was created world-readable under the usual umask.
    from calypso.registry.watch_state import WatchState

    previous = os.umask(0o022)
    try:
        SQLiteCatalogue(tmp_path / "state" / "catalogue.sqlite")
        WatchState(tmp_path / "state" / "watch.sqlite")
        db = sqlite3.connect(tmp_path / "state" / "catalogue.sqlite")  # its WAL files, open
        db.execute("CREATE TABLE probe (x)")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "state").iterdir()}
        db.close()
    finally:
        os.umask(previous)
    assert set(modes) >= {"catalogue.sqlite", "catalogue.sqlite-wal", "watch.sqlite"}, modes
    assert modes == dict.fromkeys(modes, 0o600)
    # One that is there keeps its mode (a catalogue shared on purpose).
    shared = tmp_path / "shared.sqlite"
    shared.touch(mode=0o640)
    SQLiteCatalogue(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
