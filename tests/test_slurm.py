"""The diffraction flow on a real single-node SLURM (deploy/slurm/single-node.sh).

Debian's slurm-wlm, munge, slurmdbd and MariaDB, started by the fixture (as
root, installed with apt-get when missing): the chunks must run in SLURM jobs,
as sacct shows them, and the output must equal the local run's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.api import run_technique
from calypso.settings import load_settings
from calypso.techniques.diffraction import DiffractionParameters

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "single-node.sh"


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("a single-node SLURM needs root to install and start (or one running)")
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"single-node SLURM did not start:\n{started.stdout}\n{started.stderr}")
    yield started.stdout
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True)


def integrated(summary: dict) -> np.ndarray:
    path, entry = summary["outputs"][0].split("::")
    with h5py.File(path, "r") as h5:
        return h5[entry]["intensity"][()]


def test_the_diffraction_flow_runs_its_chunks_in_slurm_jobs(slurm, diffraction_sample, tmp_path):
    parameters = DiffractionParameters(
        poni=str(diffraction_sample.calibration["poni"]),
        mask=str(diffraction_sample.calibration["mask"]),
        npt=300,
        chunk_size=3,
    )
    raw = str(diffraction_sample.raw_dataset_dir)
    local = run_technique(
        "diffraction",
        raw,
        parameters,
        None,
        str(tmp_path / "local"),
        load_settings(executor={"kind": "local", "n_workers": 1}),
    )
    job_name = f"calypso-test-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        executor={
            "kind": "slurm",
            "slurm": {
                "queue": "calypso",
                "cores": 1,
                "memory": "2GB",
                "walltime": "00:15:00",
                "lifetime": "12m",
                "minimum_jobs": 2,
                "maximum_jobs": 2,
                "job_name": job_name,
                "log_directory": str(tmp_path / "jobs"),
            },
        }
    )
    on_slurm = run_technique(
        "diffraction", raw, parameters, None, str(tmp_path / "slurm"), settings
    )
    np.testing.assert_array_equal(integrated(on_slurm), integrated(local))

    accounted = subprocess.run(
        ["sacct", "-n", "-X", "-P", f"--name={job_name}", "--format=JobID,JobName,Partition"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    jobs = {line.split("|")[0]: line.split("|")[1:] for line in accounted}
    assert jobs and all(rest == [job_name, "calypso"] for rest in jobs.values()), accounted
    workers = on_slurm["workers"]
    assert workers and all(w.startswith("slurm:") for w in workers), workers
    assert {w.removeprefix("slurm:") for w in workers} <= set(jobs)
    assert all(not w.startswith("slurm:") for w in local["workers"])
