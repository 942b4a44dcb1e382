"""Live diffraction when the stream server goes away mid-scan (docs/live.md): the run reads
the rest of the scan from its Lima files, losing no frame and taking none twice, and the
result is the offline one bit for bit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from calypso.flows.api import run_technique
from calypso.flows.online import live
from calypso.settings import load_settings
from tests.live_servers import replayed, start_valkey, stop_valkey
from tests.test_live_flow import datasets, parameters

pytestmark = pytest.mark.slow


def test_the_lima_files_give_the_rest_when_the_stream_server_goes_away(
    diffraction_sample, tmp_path, catalogue_path, scheduler
):
    from blissdata.redis_engine.store import DataStore

    (tmp_path / "valkey").mkdir()
    server, url = start_valkey(tmp_path / "valkey")
    DataStore(url, init_db=True)._redis.connection_pool.disconnect()
    live_settings = load_settings(executor={"kind": "address", "address": scheduler})
    root = tmp_path / "beamline"
    raw_dir = replayed(diffraction_sample, root)
    command = [
        sys.executable, "-m", "calypso.flows.samples.acquisition_simulator",
        str(diffraction_sample.raw_dataset_dir), str(root), "--rate", "4",
        "--frames-per-file", "3", "--start-delay", "2", "--blissdata", url,
    ]  # fmt: skip
    writer: list[subprocess.Popen] = []
    stopped_after: list[int] = []

    def beamline() -> None:
        """Start the scan once the run follows; stop the server after its 4th frame."""
        while not live._RUNS:
            time.sleep(0.02)
        writer.append(subprocess.Popen(command))
        run = next(iter(live._RUNS.values()))
        while run.scan is None or run.scan.frames < 4:
            time.sleep(0.02)
        stopped_after.append(run.scan.frames)
        stop_valkey(server)

    thread = threading.Thread(target=beamline, daemon=True)
    thread.start()
    try:
        summary = live.run_live(
            "diffraction", str(raw_dir), parameters(diffraction_sample), None, None, live_settings,
            live={"source": url, "stall_timeout": 30, "poll": 0.05},
        )  # fmt: skip
    finally:
        thread.join(timeout=60)
        stop_valkey(server)
    # The simulator's publishing fails with the server; its files are whole, as Lima's.
    writer[0].wait(timeout=60)
    assert stopped_after and stopped_after[0] < 12
    assert summary["frames"] == 12 and not summary["partial"], summary
    assert not summary["warnings"], summary["warnings"]
    offline = run_technique(
        "diffraction", str(raw_dir), parameters(diffraction_sample), None,
        str(tmp_path / "offline"), live_settings,
    )  # fmt: skip
    live_file, offline_file = (
        summary["outputs"][0].split("::")[0],
        offline["outputs"][0].split("::")[0],
    )
    assert datasets(live_file) == datasets(offline_file)
