"""`calypso watch` hears a scan end on this machine's file system (inotify) at once,
whatever its polling interval: a real watcher process, the session's Prefect server."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from calypso.flows.online.file_changes import is_dataset_file
from calypso.flows.samples.diffraction import write_diffraction_sample
from tests.processes import start, stop, wait_until

POLL_S = 600  # far longer than the test: only inotify can wake the watcher in time


def test_only_dataset_files_wake_the_watcher():
    assert is_dataset_file(None, "/d/RAW_DATA/CeO2/CeO2_0001/CeO2_0001.h5")
    assert not is_dataset_file(None, "/d/RAW_DATA/CeO2/CeO2_0001/scan0001/pilatus_0000.h5")
    assert not is_dataset_file(None, "/d/RAW_DATA/CeO2/CeO2_0001/CeO2_0001.h5.tmp")
    assert not is_dataset_file(None, "/d/PROCESSED_DATA/CeO2/CeO2_0001/CeO2_0001.h5")  # results


def test_a_scan_that_ends_is_announced_within_seconds_not_at_the_next_poll(tmp_path):
    tree = tmp_path / "visitor"
    tree.mkdir()
    home = tmp_path / "home"
    env = dict(os.environ)
    env.pop("CALYPSO_CATALOGUE__PATH", None)
    env.update(
        CALYPSO_HOME=str(home),
        CALYPSO_DATA_ROOTS=json.dumps([str(tree)]),
        CALYPSO_WATCH__BEAMLINES=json.dumps({"id00": [{"technique": "diffraction"}]}),
        CALYPSO_WATCH__INTERVAL_S=str(POLL_S),
    )
    watcher = start(["watch", str(tree)], env, tmp_path / "watch.log")
    try:
        state = home / "watch.sqlite"
        wait_until(state.exists, 60, "the watcher's first pass")  # tree empty then
        time.sleep(1)  # its listener is up
        sample = write_diffraction_sample(tree, frames=2, frames_per_file=2)
        written = time.monotonic()  # the dataset file with its end_time, written last

        def announced():
            with sqlite3.connect(state) as db:
                return db.execute(
                    "SELECT state FROM acquisitions WHERE raw_dataset = ?",
                    (os.path.realpath(sample.raw_dataset_dir),),
                ).fetchall()

        wait_until(announced, 60, "the announcement", interval=0.05)
        latency = time.monotonic() - written
        print(f"scan end -> event posted: {latency:.2f} s (polls every {POLL_S} s)")
        assert latency < 30, (tmp_path / "watch.log").read_text()[-2000:]
    finally:
        stop(watcher)
    assert Path(tmp_path / "watch.log").read_text().count("Traceback") == 0


def test_ctrl_c_or_sigterm_stops_the_watcher_soon_in_one_line(tmp_path):
    # Raised wherever the watcher was, a Ctrl-C could land inside a write of its state
    # (a misleading "cannot open ..." error); SIGTERM killed it on the spot. A stop is now
    # taken between two looks, within half a second while it waits for the next poll.
    import signal
    import subprocess
    import sys

    tree = tmp_path / "visitor"
    tree.mkdir()
    env = dict(os.environ)
    env.pop("CALYPSO_CATALOGUE__PATH", None)
    env.update(
        CALYPSO_HOME=str(tmp_path / "home"),
        CALYPSO_DATA_ROOTS=json.dumps([str(tree)]),
        CALYPSO_WATCH__BEAMLINES=json.dumps({"id00": [{"technique": "diffraction"}]}),
        CALYPSO_WATCH__INTERVAL_S=str(POLL_S),
    )
    for number in (signal.SIGINT, signal.SIGTERM):
        log = tmp_path / f"watch-{number}.log"
        with open(log, "wb") as out:
            watcher = subprocess.Popen(
                [sys.executable, "-m", "calypso.flows.cli", "watch", str(tree)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                # as at a terminal: pytest-xdist's workers ignore SIGINT, which children inherit
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )  # fmt: skip
        try:
            wait_until(lambda log=log: "watching" in log.read_text(), 60, "the watcher")
            sent = time.monotonic()
            os.killpg(watcher.pid, number)
            assert watcher.wait(timeout=30) == 0, log.read_text()[-2000:]
            assert time.monotonic() - sent < 10  # not at the next poll, 600 s away
        finally:
            stop(watcher)
        output = log.read_text()
        assert "interrupted: watch stops" in output, output[-2000:]
        assert "Traceback" not in output, output[-2000:]
