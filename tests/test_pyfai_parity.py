"""What pyFAI and ewoksxrpd users already have works as it is: a pyFAI integration
configuration (the JSON pyFAI's Worker reads) given to ``--params``."""

from __future__ import annotations

import json

import fabio
import h5py
import numpy as np
import pytest

from calypso.errors import ParameterError
from calypso.flows.api import build_parameters
from calypso.flows.cli import main


@pytest.fixture(scope="module")
def ceo2(test_data):
    return test_data / "xrd" / "CeO2_Pilatus1M.tif", test_data / "xrd" / "CeO2_Pilatus1M.poni"


def worker_configuration(poni, **options):
    """The configuration pyFAI's own Worker saves (what pyFAI-integrate writes)."""
    import pyFAI
    from pyFAI.worker import Worker

    worker = Worker(
        azimuthalIntegrator=pyFAI.load(str(poni)),
        shapeOut=(1, options.pop("npt", 1500)),
        unit=options.pop("unit", "2th_deg"),
    )
    worker.method = ("bbox", "csr", "cython")
    config = worker.get_config()
    config.update(options)
    return config


def test_a_pyfai_worker_configuration_gives_pyfais_own_pattern(
    ceo2, tmp_path, catalogue_path, capsys, on_shared_cluster
):
    image, poni = ceo2
    config = worker_configuration(poni, polarization_description=[0.99, 0], error_model="poisson")
    path = tmp_path / "integration.json"
    path.write_text(json.dumps(config))
    output = tmp_path / "out"
    # The PONI refers to the image flipped up-down (see SOURCES.md): Calypso's flip option.
    options = ["--params", str(path), "--set", "flip=ud", "--output", str(output), "--json"]
    code = main(["run", "diffraction", str(image), *options])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    nexus_file, _, group = summary["outputs"][0].partition("::")
    with h5py.File(nexus_file, "r") as h5:
        data = h5[group]
        calypso_pattern = data["intensity"][0]
        two_theta = data[data.attrs["axes"][-1]][()]

    # pyFAI's Worker with the same configuration on the same (flipped) image.
    frame = np.flipud(fabio.open(str(image)).data)
    assert_workers_pattern(config, frame, two_theta, calypso_pattern)


def assert_workers_pattern(config: dict, frame: np.ndarray, radial, pattern) -> None:
    """Calypso's ``radial`` and ``pattern`` are pyFAI's Worker's for ``config`` and ``frame``."""
    from pyFAI.worker import Worker

    worker = Worker()
    worker.set_config(config)
    worker.output = "raw"
    reference = worker.process(frame.astype(np.float32))
    np.testing.assert_allclose(radial, reference.radial, rtol=1e-6)
    valid = np.isfinite(pattern) & (reference.intensity != 0)
    assert valid.sum() > 0.9 * len(radial)
    np.testing.assert_allclose(pattern[valid], reference.intensity[valid], rtol=1e-4)


def test_configuration_keys_become_calypsos_parameters(ceo2, tmp_path):
    _, poni = ceo2
    config = worker_configuration(
        poni,
        npt=800,
        unit="q_nm^-1",
        mask_file="/data/mask.edf",
        dark_current=["/data/dark.edf"],
        radial_range=[1.0, 40.0],
        val_dummy=-2,
        delta_dummy=0.5,
        polarization_description=[0.95, 0],
        error_model="azimuthal",
    )
    path = tmp_path / "integration.json"
    path.write_text(json.dumps(config))
    parameters = build_parameters("diffraction", [], str(path))
    assert parameters.npt == 800 and parameters.unit == "q_nm^-1"
    assert parameters.mask == "/data/mask.edf" and parameters.dark == "/data/dark.edf"
    assert parameters.radial_range == (1.0, 40.0) and parameters.error_model == "azimuthal"
    assert parameters.dummy == -2 and parameters.delta_dummy == 0.5
    assert parameters.polarization_factor == 0.95
    assert parameters.geometry.dist == pytest.approx(0.208651380603)
    assert parameters.method == ("bbox", "csr", "cython")
    # A PONI named by path stays a path; --set still overrides the file.
    path.write_text(json.dumps(config | {"poni": str(poni)}))
    parameters = build_parameters("diffraction", ["npt=100"], str(path))
    assert parameters.poni == str(poni) and parameters.geometry is None and parameters.npt == 100

    # What Calypso would not do the same way is refused by name, never dropped.
    path.write_text(json.dumps(config | {"dark_current": ["/a.edf", "/b.edf"]}))
    with pytest.raises(ParameterError, match="dark_current names 2 files; Calypso takes one"):
        build_parameters("diffraction", [], str(path))
    path.write_text(json.dumps(config | {"normalization_factor": 3.0}))
    with pytest.raises(ParameterError, match="normalization_factor=3.0 is not supported"):
        build_parameters("diffraction", [], str(path))


def test_ewoksxrpd_scripts_read_calypsos_output(
    diffraction_sample, tmp_path, catalogue_path, on_shared_cluster
):
    """The paths an ewoksxrpd user's script reads: ``<scan>.1/<det>_integrate/integrated``
    with pyFAI's axis names, ``measurement/<det>_integrated`` beside the raw counters."""
    from silx.io.nxdata import NXdata

    calibration = diffraction_sample.calibration
    output = tmp_path / "out"
    options = ["--set", f"poni={calibration['poni']}", "--set", "unit=2th_deg", "--scan", "1"]
    code = main(
        [
            "run",
            "diffraction",
            str(diffraction_sample.raw_dataset_dir),
            "--output",
            str(output),
            *options,
        ]
    )
    assert code == 0
    [nexus_file] = output.glob("*.h5")
    with h5py.File(nexus_file, "r") as h5:
        nxdata = NXdata(h5["1.1/pilatus1m_integrate/integrated"])
        assert nxdata.is_valid and nxdata.axes_dataset_names == ["points", "2th"]
        assert nxdata.axes[1].attrs["units"] == "deg"
        integrated = h5["1.1/measurement/pilatus1m_integrated"]
        np.testing.assert_array_equal(integrated[()], nxdata.signal[()])
        assert integrated.shape[0] == len(h5["1.1/measurement/mon"])  # raw counters beside it
        with h5py.File(diffraction_sample.dataset.raw_file, "r") as raw:
            assert set(raw["1.1/measurement"]) < set(h5["1.1/measurement"])


def test_older_and_newer_configurations_as_pyfais_worker_reads_them(
    ceo2, tmp_path, catalogue_path, capsys, on_shared_cluster
):
    """What real configurations hold (found in the trial of session 36): a method as text
    ('splitbbox', with parts left open), a PONI file named with a wavelength that overrides
    its own, and a mask as the ``fabio:`` URL recent pyFAI writes. Calypso's pattern is
    pyFAI's Worker's for the same configuration."""
    image, poni = ceo2
    frame = np.flipud(fabio.open(str(image)).data)
    mask = tmp_path / "mask.edf"
    # The gaps of the image and of the image flipped: the same mask for Calypso, which flips
    # it with the frames, and for pyFAI's Worker, given the flipped frame.
    gaps = (frame < 0) | np.flipud(frame < 0)
    fabio.edfimage.EdfImage(data=gaps.astype(np.int8)).write(str(mask))
    config = {  # version 1 (no version key): pyFAI merges the keys over the PONI file
        "poni": str(poni), "wavelength": 1e-10, "nbpt_rad": 1000, "unit": "q_nm^-1",
        "method": "splitbbox", "do_solid_angle": True, "do_mask": True, "mask_file": f"fabio://{mask}",
    }  # fmt: skip
    path = tmp_path / "integration.json"
    path.write_text(json.dumps(config))
    parameters = build_parameters("diffraction", [], str(path))
    assert parameters.geometry.wavelength == 1e-10 and parameters.poni is None
    assert parameters.mask == str(mask) and parameters.method[:2] == ("bbox", "histogram")
    options = ["--params", str(path), "--set", "flip=ud", "--output", str(tmp_path / "out")]
    code = main(["run", "diffraction", str(image), *options, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    nexus_file, _, group = summary["outputs"][0].partition("::")
    with h5py.File(nexus_file, "r") as h5:
        data = h5[group]
        pattern, q = data["intensity"][0], data[data.attrs["axes"][-1]][()]
    assert_workers_pattern(config, frame, q, pattern)


def test_configurations_pyfai_reads_other_ways(ceo2, tmp_path):
    _, poni = ceo2
    geometry_only = {  # what blissoda keeps: the geometry, nothing of the integration
        "application": "pyfai-integrate", "version": 3, "wavelength": 1.65e-11,
        "dist": 1.01, "poni1": 0.21, "poni2": 0.14, "rot1": 0, "rot2": 0, "rot3": 0,
        "detector": "Pilatus_CdTe_2M",
    }  # fmt: skip
    path = tmp_path / "integration.json"

    def read(values):
        path.write_text(json.dumps(values))
        return build_parameters("diffraction", [], str(path))

    defaults = read(geometry_only)
    assert defaults.npt == build_parameters("diffraction", [f"poni={poni}"]).npt
    assert defaults.geometry.dist == 1.01
    # A 2D configuration made for OpenCL runs where there is none, as pyFAI's Worker does.
    azimuthal = read(
        geometry_only | {"nbpt_rad": 500, "nbpt_azim": 36, "method": ["bbox", "csr", "opencl"]}
    )
    assert azimuthal.method[:2] == ("bbox", "csr") and azimuthal.npt_azim == 36
    for integrator in ("sigma_clip_ng", "medfilt1d_ng"):
        with pytest.raises(
            ParameterError, match=f"integrator_name='{integrator}' is not supported"
        ):
            read(geometry_only | {"integrator_name": integrator})
    # Darks as pyFAI 0.x wrote them: one text of comma-separated files.
    with pytest.raises(ParameterError, match="dark_current names 2 files; Calypso takes one"):
        read(geometry_only | {"dark_current": "/a.edf,/b.edf", "do_dark": True})
    with pytest.raises(ParameterError, match="takes frame .2,. of its file"):
        read(geometry_only | {"mask_file": "fabio:///data/masks.edf?slice=2", "do_mask": True})
