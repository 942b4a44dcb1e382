"""What a confined thread may open (registry/access/landlock.py): the proposal's folder,
read and written; shared folders, read only; nothing else, whatever a symlink says."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from calypso.registry.access import AccessError, landlock
from calypso.registry.access.landlock import Confinement, proposal_confinement, within
from calypso.settings import load_settings

pytestmark = pytest.mark.skipif(
    not landlock.abi_version(), reason="this kernel has no Landlock: nothing is confined"
)


@pytest.fixture
def facility(tmp_path, monkeypatch):
    visitor = tmp_path / "visitor"
    for proposal in ("ih0001", "ih0002"):
        (visitor / proposal / "RAW_DATA").mkdir(parents=True)
        (visitor / proposal / "RAW_DATA" / "frames.dat").write_text(f"frames of {proposal}")
    shared = tmp_path / "calibrations"
    shared.mkdir()
    (shared / "ceo2.poni").write_text("Distance: 0.1")
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", json.dumps([str(visitor)]))
    monkeypatch.setenv("CALYPSO_ACCESS__SHARED_PATHS", json.dumps([str(shared)]))
    return visitor, shared


def _read(path: Path) -> str:
    return path.read_text()


def test_a_proposal_confinement_opens_its_own_files_only(facility, tmp_path):
    visitor, shared = facility
    mine, theirs = visitor / "ih0001", visitor / "ih0002"
    confinement = proposal_confinement(load_settings(), mine / "RAW_DATA" / "frames.dat")
    assert confinement == Confinement("ih0001", (str(mine.resolve()),), (str(shared.resolve()),))
    assert within(confinement, _read, mine / "RAW_DATA" / "frames.dat") == "frames of ih0001"
    assert within(confinement, _read, shared / "ceo2.poni") == "Distance: 0.1"
    (tmp_path / "secret").write_text("Calypso's own")
    # A symlink in the proposal that leads into another one, made whenever: not opened.
    (mine / "RAW_DATA" / "link.dat").symlink_to(theirs / "RAW_DATA" / "frames.dat")
    (mine / "RAW_DATA" / "folder").symlink_to(theirs / "RAW_DATA")
    for path in (
        mine / "RAW_DATA" / "link.dat",
        mine / "RAW_DATA" / "folder" / "frames.dat",
        theirs / "RAW_DATA" / "frames.dat",
        tmp_path / "secret",
    ):
        with pytest.raises(AccessError, match="a file outside proposal ih0001 was not opened"):
            within(confinement, _read, path)
    # Writes: inside the proposal only; nothing is made elsewhere, not even a name.
    within(confinement, (mine / "out.txt").write_text, "result")
    for path in (theirs / "out.txt", mine / "RAW_DATA" / "folder" / "x"):
        with pytest.raises(AccessError, match=f"{path} leads outside the proposal's folders"):
            within(confinement, path.write_text, "result")
        assert not path.exists()
    with pytest.raises(PermissionError):  # a shared folder: read only, its own name told
        within(confinement, (shared / "out.txt").write_text, "result")
    assert not (shared / "out.txt").exists()
    with pytest.raises(AccessError):
        within(confinement, os.mkdir, theirs / "made")
    assert not (theirs / "made").exists()
    # The caller's own thread is not confined: the kernel confines the thread it hands to.
    assert _read(theirs / "RAW_DATA" / "frames.dat") == "frames of ih0002"


def test_what_is_not_confined(facility, monkeypatch):
    visitor, _ = facility
    settings = load_settings()
    assert proposal_confinement(settings, "/elsewhere/data.h5") is None  # under no root
    assert proposal_confinement(settings, visitor) is None  # a root, no proposal
    monkeypatch.delenv("CALYPSO_DATA_ROOTS")
    assert proposal_confinement(load_settings(), visitor / "ih0001") is None
    assert within(None, _read, visitor / "ih0002" / "RAW_DATA" / "frames.dat")


def test_confined_threads_are_kept_per_proposal(facility):
    """A proposal's reads go to threads kept for it (their OpenMP teams last); a call in
    such a thread for the same proposal runs there, not in another thread."""
    visitor, _ = facility
    confinement = proposal_confinement(load_settings(), visitor / "ih0001")
    first = within(confinement, threading.get_ident)

    def twice() -> tuple[int, int]:
        return threading.get_ident(), within(confinement, threading.get_ident)

    nested = within(confinement, twice)
    assert nested[0] == nested[1]
    assert first != threading.get_ident()
    assert "kept inside its proposal by the kernel" in landlock.describe()


def test_a_ctrl_c_waits_for_the_confined_step_in_progress(facility, caplog):
    """Python cannot stop a confined thread: a Ctrl-C while the main thread waits for one
    waits for its step to end (a run's writer went on into the command's exit, its imports
    and logs refused there: tracebacks after `interrupted`), and says so after a second."""
    import signal

    visitor, _ = facility
    confinement = proposal_confinement(load_settings(), visitor / "ih0001")
    ended = threading.Event()

    def step() -> None:
        time.sleep(1.6)
        ended.set()

    # A command's own handler (a library imported earlier in this process may have set
    # another: dask-jobqueue's raises SystemExit).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            within(confinement, step)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ended.is_set()
    assert "the step in progress ends first" in caplog.text


def test_more_proposals_at_once_than_threads_are_kept_for(facility):
    """The portal reads for many proposals at once: threads kept for a proposal are let go
    for another's, never while a read waits for them."""
    from concurrent.futures import ThreadPoolExecutor

    visitor, _ = facility
    proposals = [f"ih{n:04d}" for n in range(10, 18)]
    for proposal in proposals:
        (visitor / proposal).mkdir()
        (visitor / proposal / "data.txt").write_text(proposal)
    settings = load_settings()

    def read(proposal: str) -> str:
        path = visitor / proposal / "data.txt"
        return within(proposal_confinement(settings, path), _read, path)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(read, proposals * 6)) == proposals * 6


def test_libraries_imported_first_in_a_confined_thread(facility, tmp_path):
    """larch (and matplotlib, joblib, dill under it) look for a temporary folder, their
    configuration and the machine as they are imported: imported first by a confined thread
    they failed (a plain column file under data roots did not run). A new process, a new
    home: nothing imported or configured before. A SPEC file's scan goes through a
    temporary file (refused in the system's temporary folder: no SPEC file ran under data
    roots); a writer's drawing thread, started by a confined one, is confined too (it
    built matplotlib's font cache, which it could not save, at each run)."""
    import subprocess
    import sys

    visitor, _ = facility
    columns = visitor / "ih0001" / "RAW_DATA" / "cu_plain.dat"
    energy = [8900.0 + 2.0 * n for n in range(200)]
    rows = [f"{e:.1f} {1e5:.1f} {1e5 * (0.5 + 0.3 * (e > 8979)):.3f}" for e in energy]
    columns.write_text("# energy i0 itrans\n" + "\n".join(rows) + "\n")
    spec = columns.with_name("cu.spec")
    scans = [f"#S {n} xafs\n#N 3\n#L Energy  I0  I1\n" + "\n".join(rows) + "\n" for n in (3, 4)]
    spec.write_text("#F cu.spec\n\n" + "\n".join(scans))
    script = f"""
from calypso.registry.access.landlock import proposal_confinement, within
from calypso.settings import load_settings
from calypso.tasks.raw.spectrum_files import read_with_larch
path = {str(columns)!r}
confinement = proposal_confinement(load_settings(), path)
assert confinement is not None
columns, header = within(confinement, read_with_larch, __import__("pathlib").Path(path))
print(sorted(columns), len(next(iter(columns.values()))))
import psutil
print(within(confinement, lambda: psutil.cpu_times().user >= 0))
from calypso.tasks.raw.spectrum_files import read_columns
columns, _ = within(confinement, read_columns, __import__("pathlib").Path({str(spec)!r}), "3")
print("spec", sorted(columns))
import threading
from calypso.tasks.writers.plots import _pyplot
def draw():
    drawn = []
    thread = threading.Thread(target=lambda: drawn.append(_pyplot().subplots(figsize=(2, 2))))
    thread.start()
    thread.join()
    return len(drawn)
print("drawn", within(confinement, draw))
"""
    home = tmp_path / "fresh-home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("MPLCONFIGDIR", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "200" in done.stdout and "True" in done.stdout, done.stdout
    assert "spec ['energy', 'i0', 'i1']" in done.stdout and "drawn 1" in done.stdout, done.stdout
    assert "font_manager" not in done.stderr and "Fontconfig" not in done.stderr, done.stderr
    assert list((home / ".cache" / "matplotlib").glob("fontlist*.json"))  # kept for the next


def test_calypso_own_scratch_stays_writable(facility):
    """The running chunks' folder (worker processes sharing the cores) is Calypso's own: a
    confined chunk still claims its place there (a sweep found core sharing off)."""
    from calypso.executors.worker_setup import running_chunks_folder

    visitor, _ = facility
    confinement = proposal_confinement(load_settings(), visitor / "ih0001")
    folder = running_chunks_folder()
    assert folder is not None
    probe = folder / f".probe-{os.getpid()}"
    within(confinement, probe.write_text, "claimed")
    assert probe.read_text() == "claimed"
    probe.unlink()


def test_a_confined_thread_keeps_the_settings_read_before_it(facility, tmp_path, monkeypatch):
    """Calypso configured by a file (`CALYPSO_CONFIG`, ~/.config/calypso/config.toml): a
    served run's write step, confined to its proposal, read the settings again to find
    its path map and the proposal of its output, and the kernel refused the file ("...
    config.toml leads outside the proposal's folders"): every run in serve failed once
    its chunks were done (a helper's walk of the operations docs). Settings are read
    before a thread is confined, and kept there, the file edited meanwhile or not."""
    from calypso.tasks.writers.permissions import default_permissions

    visitor, shared = facility
    config = tmp_path / "calypso.toml"
    config.write_text(f'data_roots = ["{visitor}"]\n\n[access]\nshared_paths = ["{shared}"]\n')
    monkeypatch.delenv("CALYPSO_DATA_ROOTS")
    monkeypatch.delenv("CALYPSO_ACCESS__SHARED_PATHS")
    monkeypatch.setenv("CALYPSO_CONFIG", str(config))
    output = visitor / "ih0001" / "PROCESSED_DATA"
    output.mkdir()

    def write_step() -> str:  # as a writer does, inside the run's confinement
        default_permissions()
        return landlock.in_proposal(output, (output / "result.h5").write_text, "result") and "ok"

    confinement = landlock.confinement_of(output)
    assert confinement is not None and confinement.proposal == "ih0001"
    assert within(confinement, write_step) == "ok"
    later = config.stat().st_mtime_ns + 10**9
    os.utime(config, ns=(later, later))  # the configuration edited while serve runs
    assert within(confinement, write_step) == "ok"
    with pytest.raises(AccessError, match="calypso.toml leads outside the proposal"):
        within(confinement, config.read_text)  # the file itself: outside, as before


def test_a_module_another_thread_is_importing_is_waited_for_not_taken_half_made(
    tmp_path, monkeypatch
):
    """A sweep's variants write their quick looks at once: one thread imported matplotlib,
    another took it from sys.modules half made ("partially initialized module
    'matplotlib.figure' has no attribute 'Figure'"), and the variant failed."""
    import sys
    import time

    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.5)\nFigure = object\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_to_import", raising=False)
    found = []
    first = threading.Thread(target=lambda: found.append(landlock.imported("slow_to_import")))
    first.start()
    while "slow_to_import" not in sys.modules:
        time.sleep(0.001)
    assert landlock.imported("slow_to_import").Figure is object  # waited for the first
    first.join()
    assert found[0].Figure is object
