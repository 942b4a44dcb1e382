"""A fifth technique added through its descriptor alone (``tests/toy_technique``): Calypso's
CLI, ``calypso serve`` and user flows take it up with no change to Calypso's code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def toy_env(tmp_path, monkeypatch, capsys):
    """Calypso told of the toy technique, in this process (the CLI runs in it) and in the
    processes it starts (Dask workers, `calypso serve`)."""
    from calypso.flows.techniques import TECHNIQUES

    env = {
        "CALYPSO_TECHNIQUES": "toy_technique:FRAME_STATISTICS",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "CALYPSO_HOME": str(tmp_path / "home"),
        "CALYPSO_EXECUTOR__N_WORKERS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CALYPSO_CATALOGUE__PATH", raising=False)
    monkeypatch.syspath_prepend(str(TESTS))
    TECHNIQUES.reload()
    yield dict(os.environ)
    TECHNIQUES.reload()  # read again, without the toy, when next asked


def calypso(capsys, *arguments: str) -> str:
    """The `calypso` command, in this process (a process each would cost seconds)."""
    from calypso.flows.cli import main

    capsys.readouterr()
    code = main(list(arguments))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def statistics(url: str) -> np.ndarray:
    path, dataset = url.split("::")
    with h5py.File(path, "r") as h5:
        return h5[dataset][()]


def test_a_technique_added_by_its_descriptor_runs_everywhere(tmp_path, toy_env, capsys):
    # The CLI knows it: its sample data, its parameters, `calypso run`.
    printed = calypso(capsys, "sample-data", "frame-statistics", str(tmp_path), "--frames", "9")
    session = tmp_path / "ih0001/id00/20261203"
    stack = session / "RAW_DATA/stack/stack_0001/stack_0001.h5"
    assert str(stack) in printed
    assert "threshold" in calypso(capsys, "parameters", "frame-statistics")
    summary = json.loads(
        calypso(
            capsys, "run", "frame-statistics", str(stack), "--output", str(tmp_path / "cli"),
            "--set", "threshold=4", "--json",
        )
    )  # fmt: skip
    with h5py.File(stack, "r") as h5:
        frames = h5["data"][()]
    kept = np.where(frames > 4, frames, 0).astype(np.float64)
    expected = np.stack([kept.mean(axis=(1, 2)), kept.max(axis=(1, 2))], axis=1)
    np.testing.assert_array_equal(statistics(summary["outputs"][0]), expected)
    assert summary["count"] == 9 and summary["tasks"] == 3 and summary["frames"] == 9
    assert set(summary["timings_s"]) == {"total", "measure", "write", "busy_in_tasks"}

    # As a saved user flow: exported, saved, run; the same result, the same report.
    spec = yaml.safe_load(calypso(capsys, "flows", "export", "frame-statistics"))
    spec["steps"]["plan"]["parameters"]["threshold"] = 4
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec))
    calypso(capsys, "flows", "save", str(path), "--name", "my-statistics")
    result = json.loads(
        calypso(
            capsys, "flows", "run", "my-statistics", str(stack), "--output",
            str(session / "PROCESSED_DATA/saved"), "--json",
        )
    )  # fmt: skip
    [variant] = result["variants"]
    np.testing.assert_array_equal(statistics(variant["outputs"][0]), expected)
    assert set(variant) == set(summary) - {"wall_s"}

    # From a `calypso serve` deployment, as the Prefect UI or a trigger starts it.
    # serve acts for everyone: it starts only with data roots, and confines each run to one
    # proposal under them (outputs included).
    served = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "serve", "--technique", "frame-statistics"],
        env=dict(toy_env, CALYPSO_DATA_ROOTS=json.dumps([str(tmp_path)])),
        stdout=open(tmp_path / "serve.log", "wb"),  # noqa: SIM115 (the process keeps it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = _run_deployment(
            "frame-statistics/frame-statistics",
            {"raw": str(stack), "output_dir": str(session / "PROCESSED_DATA/served")},
            served,
            tmp_path / "serve.log",
        )
        assert run.state.is_completed(), run.state
        served_output = session / "PROCESSED_DATA/served" / "frame_statistics.h5"
        np.testing.assert_array_equal(
            statistics(f"{served_output}::/statistics"), _default_statistics(frames)
        )
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=30)
        _delete_deployment("frame-statistics/frame-statistics")


def _default_statistics(frames: np.ndarray) -> np.ndarray:
    """The statistics with the default threshold (0 counts)."""
    kept = np.where(frames > 0, frames, 0).astype(np.float64)
    return np.stack([kept.mean(axis=(1, 2)), kept.max(axis=(1, 2))], axis=1)


def _run_deployment(name: str, parameters: dict, served: subprocess.Popen, log: Path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    deadline = time.monotonic() + 180
    while True:
        assert served.poll() is None, log.read_text()[-3000:]
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(name)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"no deployment {name}: {log.read_text()[-3000:]}"
                    ) from None
        time.sleep(1)
    return run_deployment(name, parameters=parameters, timeout=240)


def _delete_deployment(name: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_deployment(client.read_deployment_by_name(name).id)
