"""`calypso server` on PostgreSQL (Debian's postgresql), and a flow run recorded there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import processes

pytestmark = pytest.mark.slow
BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory, loopback):
    if not (BIN / "postgres").exists() or os.geteuid() != 0:
        pytest.skip("Debian's postgresql 15 (and root, to run it as postgres) are needed")
    # Not under pytest's temporary folders: their parents are root's alone.
    data = Path(tempfile.mkdtemp(prefix="calypso-pgdata-"))
    shutil.chown(data, "postgres", "postgres")
    data.chmod(0o700)
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    port = loopback.free_port()
    server = subprocess.Popen(
        [
            *as_postgres,
            BIN / "postgres",
            "-D",
            data,
            "-p",
            str(port),
            "-k",
            data,
            "-h",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = [BIN / "pg_isready", "-h", "127.0.0.1", "-p", str(port)]
    for _ in range(60):
        if subprocess.run(ready, capture_output=True).returncode == 0:
            break
        __import__("time").sleep(0.5)
    psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    subprocess.run([*psql, "-c", "CREATE DATABASE prefect"], check=True, capture_output=True)
    yield port, psql
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)


def test_a_flow_run_is_recorded_by_a_prefect_server_on_postgresql(
    postgres, loopback, diffraction_sample, tmp_path
):
    port, psql = postgres
    api_port = loopback.free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect",
        PREFECT_HOME=str(tmp_path / "prefect"),
        CALYPSO_HOME=str(tmp_path / "calypso"),
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_AUTH_STRING", None)  # its server's secret is in its own home
    command = [sys.executable, "-m", "calypso.flows.cli"]
    server = subprocess.Popen(
        [*command, "server", "--port", str(api_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        api = f"http://127.0.0.1:{api_port}/api"
        loopback.wait_for_http(f"{api}/health", 180, server)
        env["PREFECT_API_URL"] = api
        calibration = diffraction_sample.calibration
        run = processes.run(
            [
                "run",
                "diffraction",
                str(diffraction_sample.raw_dataset_dir),
                "--set",
                f"poni={calibration['poni']}",
                "--set",
                f"mask={calibration['mask']}",
                "--output",
                str(tmp_path / "out"),
                "--workers",
                "1",
                "--json",
            ],
            env,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        flow_run_id = json.loads(run.stdout)["flow_run_id"]
        stored = subprocess.run(
            [
                *psql,
                "-d",
                "prefect",
                "-tA",
                "-c",
                f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert stored == "COMPLETED"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
