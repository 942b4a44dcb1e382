"""Workers that mount the facility's data elsewhere (CALYPSO_PATH_MAP)."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from calypso.flows.api import run_technique
from calypso.settings import load_settings
from calypso.techniques.diffraction import DiffractionParameters

pytestmark = pytest.mark.slow


def test_workers_read_the_files_where_they_mount_them(diffraction_sample, tmp_path, monkeypatch):
    """The flow plans with the submitter's path; workers map it to their own mount. Here
    the workers' mount holds the same dataset with every frame doubled, so the result
    shows which files the workers read."""
    seen_here = diffraction_sample.dataset.root  # e.g. /data/visitor where the flow runs
    on_workers = tmp_path / "mnt" / "visitor"
    shutil.copytree(seen_here, on_workers)
    for lima in on_workers.rglob("pilatus1m_*.h5"):
        with h5py.File(lima, "r+") as h5:
            frames = h5["entry_0000/measurement/data"]
            frames[...] = np.where(frames[...] >= 0, 2 * frames[...], frames[...])
    parameters = DiffractionParameters(
        poni=str(diffraction_sample.calibration["poni"]),
        mask=str(diffraction_sample.calibration["mask"]),
        npt=200,
        error_model=None,
    )
    raw = str(diffraction_sample.raw_dataset_dir)
    # Worker processes, started for each run: a worker of threads in this process would
    # read this process's map.
    settings = load_settings(executor={"kind": "local", "n_workers": 1, "local_threads": False})

    def intensity(output: str) -> np.ndarray:
        summary = run_technique("diffraction", raw, parameters, None, output, settings)
        path, entry = summary["outputs"][0].split("::")
        with h5py.File(path, "r") as h5:
            return h5[entry]["intensity"][()]

    direct = intensity(str(tmp_path / "direct"))
    # Workers (started after this) see /data/visitor at the other mount.
    monkeypatch.setenv("CALYPSO_PATH_MAP", json.dumps({str(seen_here): str(on_workers)}))
    mapped = intensity(str(tmp_path / "mapped"))
    np.testing.assert_allclose(mapped, 2 * direct, rtol=1e-5)
