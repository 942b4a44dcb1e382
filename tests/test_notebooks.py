"""``calypso.run`` and ``calypso.load``: Calypso from a plain script (no ``__main__`` guard)
and results read back as arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import calypso
from calypso.errors import CalypsoError, OutputError, ParameterError


def test_a_script_without_a_main_guard_runs_and_loads_its_result(
    diffraction_sample, catalogue_path, tmp_path
):
    """Workers start with "spawn": unguarded, the script would run again in each of them."""
    calibration = diffraction_sample.calibration
    output = tmp_path / "out"
    script = tmp_path / "reduce.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, calypso
            print("script body ran", flush=True)  # must appear once: workers don't rerun it
            result = calypso.run(
                "diffraction", {str(diffraction_sample.raw_dataset_dir)!r},
                poni={str(calibration["poni"])!r}, mask={str(calibration["mask"])!r},
                npt=500, output={str(output)!r}, workers=2,
            )
            again = calypso.load(result.record.id)
            print(json.dumps({{
                "id": result.record.id,
                "shape": list(result.data.signal.shape),
                "axes": list(result.data.axes),
                "npt": result.parameters["npt"],
                "frames": result.summary["frames"],
                "same": again.data.url == result.data.url,
            }}))
            """
        )
    )
    process = subprocess.run(
        [sys.executable, str(script)],
        env=os.environ | {"CALYPSO_CATALOGUE__PATH": str(catalogue_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    lines = process.stdout.splitlines()
    assert lines.count("script body ran") == 1
    report = json.loads(lines[-1])
    assert report["shape"] == [12, 500] and report["frames"] == 12 and report["npt"] == 500
    assert report["axes"][-1] == "q" and report["same"]
    assert "Traceback" not in process.stderr and "database is locked" not in process.stderr

    # Loaded back in this process by file and by folder: the same arrays as the file holds.
    by_file = calypso.load(output / "CeO2_0001.h5")
    by_folder = calypso.load(output)
    assert by_file.record.id == by_folder.record.id == report["id"]
    with h5py.File(by_file.data.file, "r") as h5:
        expected = h5[by_file.data.path]["intensity"][()]
    np.testing.assert_array_equal(by_folder.data.signal, expected)
    assert by_file.data.units["q"] == "nm^-1"


def test_load_without_a_catalogue_record_and_bad_sources(tmp_path, catalogue_path):
    file = tmp_path / "spectrum.h5"
    with h5py.File(file, "w") as h5:
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs["default"] = "mu"
        mu = entry.create_group("mu")
        mu.attrs.update(NX_class="NXdata", signal="mu", axes=["energy"])
        mu["mu"] = np.linspace(0, 1, 5)
        mu["energy"] = np.arange(5.0)
        mu["energy"].attrs["units"] = "eV"
    result = calypso.load(file)
    assert result.record is None and result.technique == "unknown"
    np.testing.assert_array_equal(result.data.axes["energy"], np.arange(5.0))
    assert result.data.errors is None and result.data.units == {"energy": "eV"}

    with pytest.raises(CalypsoError, match="neither a catalogue id nor an existing file"):
        calypso.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="holds no NeXus result"):
        calypso.load(tmp_path / "empty")
    with pytest.raises(ParameterError, match=r"unknown diffraction parameter 'nptt' \(did you"):
        calypso.run("diffraction", str(tmp_path), nptt=10)
    assert not Path(tmp_path / "out").exists()
