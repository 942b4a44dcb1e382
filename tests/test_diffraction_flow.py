"""The diffraction flow end to end: Prefect server, local Dask cluster, NeXus, catalogue."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from pyFAI.integrator.azimuthal import AzimuthalIntegrator
from scipy.signal import find_peaks

from calypso.errors import RawDataError
from calypso.executors.dask import worker_identity
from calypso.flows.api import run_technique
from calypso.flows.runtime import prefect_auth_headers
from calypso.registry import SQLiteCatalogue
from calypso.settings import load_settings
from calypso.tasks.diffraction import _add_rows_in_order
from calypso.tasks.plans.diffraction import load_geometry
from calypso.tasks.progress import listening
from calypso.techniques.diffraction import DiffractionParameters
from tests.clusters import run_flow as run_on_shared_cluster

pytestmark = pytest.mark.slow


def run_flow(input_path, parameters, workers=2, output=None):
    return run_on_shared_cluster("diffraction", input_path, parameters, workers, output)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(diffraction_sample, tmp_path_factory):
    """The same dataset reduced three times: 1 worker with 5-frame chunks, 2 workers with
    defaults, and in 4-frame chunks on a cluster of the run's own, whose worker is two
    threads of this process (diffraction's ``threaded_chunks``)."""
    catalogue = tmp_path_factory.mktemp("catalogue") / "catalogue.sqlite"
    os.environ["CALYPSO_CATALOGUE__PATH"] = str(catalogue)
    raw_before = digest(diffraction_sample.raw_dataset_dir)
    base = DiffractionParameters(
        poni=str(diffraction_sample.calibration["poni"]),
        mask=str(diffraction_sample.calibration["mask"]),
        monitor="mon",
        monitor_reference=1e5,
        npt=500,
    )
    small_chunks = run_flow(
        diffraction_sample.raw_dataset_dir,
        base.model_copy(update={"chunk_size": 5}),
        workers=1,
        output=str(tmp_path_factory.mktemp("one_worker")),
    )
    progress: list[tuple[int, int]] = []
    with listening(lambda done, total: progress.append((done, total))):
        default = run_flow(diffraction_sample.raw_dataset_dir, base, workers=2)
    threads = run_technique(
        "diffraction",
        str(diffraction_sample.raw_dataset_dir),
        base.model_copy(update={"chunk_size": 4}),
        None,
        str(tmp_path_factory.mktemp("threads")),
        load_settings(executor={"n_workers": 2}),  # kind local, none kept (conftest.py)
    )
    yield {
        "threads": threads,
        "small_chunks": small_chunks,
        "default": default,
        "parameters": base,
        "catalogue": catalogue,
        "raw_before": raw_before,
        "progress": progress,
    }
    del os.environ["CALYPSO_CATALOGUE__PATH"]


def read_integrated(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    file_name, path = url.split("::")
    with h5py.File(file_name, "r") as h5:
        data = h5[path]
        return data["intensity"][()], data["intensity_errors"][()], data["q"][()]


def test_results_do_not_depend_on_chunks_or_workers(runs):
    assert runs["small_chunks"]["chunks"] == 3 and runs["small_chunks"]["chunk_size"] == 5
    assert runs["default"]["chunk_size"] != 5
    a = read_integrated(runs["small_chunks"]["outputs"][0])
    for other in ("default", "threads"):
        b = read_integrated(runs[other]["outputs"][0])
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("n_frames", "rows", "bounds"),
    [(600, 400, [0, 100, 350, 600]), (5000, 400, [0, 37, 2501, 5000]), (7, 7, [0, 3, 7])],
)
def test_the_quick_looks_rows_average_frames_as_np_add_at_does(n_frames, rows, bounds):
    # Frames averaged into the quick look's rows chunk by chunk: the same sums to the bit
    # as numpy's unbuffered add, whose order of additions they keep.
    rng = np.random.default_rng(n_frames)
    expected, expected_counts = np.zeros((rows, 30)), np.zeros(rows)
    sums, counts = np.zeros((rows, 30)), np.zeros(rows)
    for start, stop in itertools.pairwise(bounds):
        block = (rng.standard_normal((stop - start, 30)) * 1e3).astype(np.float32)
        into = np.arange(start, stop) * rows // n_frames
        np.add.at(expected, into, block)
        np.add.at(expected_counts, into, 1)
        _add_rows_in_order(sums, counts, into, block)
    np.testing.assert_array_equal(sums, expected)
    np.testing.assert_array_equal(counts, expected_counts)


def test_a_cluster_of_the_runs_own_integrates_in_its_threads(runs):
    # Its one worker is this process: no worker processes started; its chunks ran there.
    assert runs["threads"]["workers"] == [worker_identity()]
    assert runs["threads"]["chunks"] == 3
    assert worker_identity() not in runs["default"]["workers"]


def test_a_cold_command_integrates_its_first_chunks_while_prefects_server_starts(
    runs, diffraction_sample, tmp_path
):
    """With no Prefect server to use, `calypso run` starts one and waits for it; its own
    cluster's chunks run in its threads, so it integrates the first chunks meanwhile
    (calypso.tasks.head_start) and the run's chunk tasks take them: the patterns are the
    other runs' bit for bit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CALYPSO_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        CALYPSO_HOME=str(tmp_path / "calypso"),
        CALYPSO_SERVER__LOCAL_KEEP_S="0",
        CALYPSO_CATALOGUE__PATH=str(tmp_path / "catalogue.sqlite"),
        TMPDIR=str(tmp_path / "tmp"),  # where the head start stages its chunks
    )
    (tmp_path / "tmp").mkdir()
    p = runs["parameters"]
    settings = [f"poni={p.poni}", f"mask={p.mask}", "monitor=mon", "monitor_reference=1e5"]
    settings += ["npt=500", "chunk_size=4"]
    command = [sys.executable, "-m", "calypso.flows.cli", "run", "diffraction"]
    command += [str(diffraction_sample.raw_dataset_dir), "--output", str(tmp_path / "out")]
    command += [arg for value in settings for arg in ("--set", value)] + ["--json"]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    assert summary["chunks"] == 3 and summary["head_start_chunks"] >= 1, summary
    a = read_integrated(runs["small_chunks"]["outputs"][0])
    b = read_integrated(summary["outputs"][0])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not list((tmp_path / "tmp").glob("calypso-head-start-*")), "its staging folder left"


def test_flow_equals_a_direct_pyfai_integration(runs, diffraction_sample):
    intensity, errors, q = read_integrated(runs["default"]["outputs"][0])
    parameters = runs["parameters"]
    integrator = AzimuthalIntegrator().set_config(load_geometry(parameters).as_pyfai_config())
    raw_file = diffraction_sample.dataset.raw_file
    import fabio

    mask = fabio.open(str(diffraction_sample.calibration["mask"])).data
    with h5py.File(raw_file, "r") as h5:
        frames = h5["1.1/measurement/pilatus1m"][()]
        monitor = h5["1.1/measurement/mon"][()]
    assert intensity.shape == (12, 500)
    for index in (0, 7, 11):
        direct = integrator.integrate1d(
            frames[index],
            500,
            unit="q_nm^-1",
            mask=mask,
            error_model="poisson",
            method=("bbox", "csr", "cython"),
            normalization_factor=monitor[index] / 1e5,
        )
        np.testing.assert_allclose(intensity[index], direct.intensity, rtol=1e-6)
        np.testing.assert_allclose(errors[index], direct.sigma, rtol=1e-6)
        np.testing.assert_allclose(q, direct.radial, rtol=1e-12)


def test_results_land_in_processed_data_as_nexus(runs, diffraction_sample, tmp_path, monkeypatch):
    summary = runs["default"]
    processed = diffraction_sample.dataset.processed_dataset_dir("diffraction")
    assert summary["processed_dataset_dir"] == str(processed)
    nexus_file = processed / "CeO2_0001.h5"
    assert summary["outputs"] == [f"{nexus_file}::/1.1/pilatus1m_integrate/integrated"]
    monkeypatch.chdir(tmp_path)  # external links must not depend on the working directory
    with h5py.File(nexus_file, "r") as h5:
        assert h5.attrs["default"] == "1.1"
        entry = h5["1.1"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert entry.attrs["default"] == "pilatus1m_integrate/integrated"
        process = entry["pilatus1m_integrate"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["program"][()] == b"calypso"
        config = json.loads(process["configuration/data"][()])
        assert config["parameters"]["npt"] == 500 and config["parameters"]["monitor"] == "mon"
        assert config["geometry"]["detector"] == "Pilatus1M"
        provenance = json.loads(process["provenance/data"][()])
        assert provenance["flow_run_id"] == summary["flow_run_id"]
        assert "pyFAI" in provenance["software"]
        data = process["integrated"]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "intensity"
        assert list(data.attrs["axes"]) == ["points", "q"]
        assert data["q"].attrs["units"] == "nm^-1"
        # links back to the raw scan resolve
        assert entry["instrument/pilatus1m/data"].shape == (12, 1043, 981)
        assert entry["measurement/mon"].shape == (12,)
        assert entry["sample/name"][()] == b"CeO2"
        assert entry["end_time"][()]
        average = process["average/intensity"][()]
    pattern = np.loadtxt(processed / "CeO2_0001_0001_pilatus1m.xy")
    assert pattern.shape == (500, 3)
    np.testing.assert_allclose(pattern[:, 1], average, rtol=1e-6)
    intensity, _, _ = read_integrated(summary["outputs"][0])
    np.testing.assert_allclose(average, intensity.mean(axis=0), rtol=1e-6)
    leftovers = [p.name for p in processed.iterdir() if p.name.startswith(".calypso")]
    assert leftovers == []


def test_an_aborted_scan_reduced_offline_is_marked_partial(
    runs, diffraction_sample, tmp_path, catalogue_path
):
    """A scan aborted mid-way (Bliss's end_reason USER_ABORT) reduced offline, by hand or
    by the watcher at its end, gave a result that looked complete (a sweep): marked partial
    as a live run marks it, with a warning; the frames it recorded are reduced. The partial
    file a killed live run left beside the result ("running: ...") goes with the run's
    end, whether it completes or fails."""
    import shutil

    from tests.damage import damage_stored_frame

    raw = tmp_path / "ih0001" / "id00" / "20261207" / "RAW_DATA" / "CeO2" / "CeO2_0001"
    shutil.copytree(diffraction_sample.raw_dataset_dir, raw)
    with h5py.File(raw / "CeO2_0001.h5", "a") as h5:
        h5["1.1/end_reason"] = "USER_ABORT"
    stale = tmp_path / "out" / "CeO2_0001.partial.h5"
    stale.parent.mkdir()
    stale.write_text("running: 10 of 12 frames done")
    settings = load_settings(executor={"n_workers": 1})
    summary = run_technique(
        "diffraction", str(raw), runs["parameters"], None, str(tmp_path / "out"), settings
    )
    assert not stale.exists()
    assert summary["warnings"] == [
        "scan 1.1 ended early (USER_ABORT): its result holds what it recorded, marked partial"
    ]
    record = SQLiteCatalogue(catalogue_path).get(summary["catalogue_id"])
    assert (record.status, record.message) == (
        "completed",
        "partial: scan 1.1 ended early (USER_ABORT)",
    )
    with h5py.File(tmp_path / "out" / "CeO2_0001.h5", "r") as h5:
        assert h5.attrs["status"] == "partial"
        assert h5["1.1/status"][()] == b"partial: scan 1.1 ended early (USER_ABORT)"
    # A scan that ended well says nothing of the kind.
    with h5py.File(diffraction_sample.raw_dataset_dir / "CeO2_0001.h5", "r") as raw_file:
        assert "end_reason" not in raw_file["1.1"] or raw_file["1.1/end_reason"][()] == b"SUCCESS"
    with h5py.File(runs["default"]["outputs"][0].split("::")[0], "r") as h5:
        assert "status" not in h5.attrs and "status" not in h5["1.1"]
    failing = tmp_path / "failing" / stale.name
    failing.parent.mkdir()
    failing.write_text("running: 10 of 12 frames done")
    damage_stored_frame(raw, 11)
    with pytest.raises(RawDataError):
        run_technique(
            "diffraction", str(raw), runs["parameters"], None, str(failing.parent), settings
        )
    assert not failing.exists()


def test_progress_is_reported_as_chunks_finish(runs):
    progress = runs["progress"]
    assert progress[0] == (0, 12) and progress[-1] == (12, 12)
    assert len(progress) == runs["default"]["chunks"] + 1
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_raw_data_is_left_untouched(runs, diffraction_sample):
    assert digest(diffraction_sample.raw_dataset_dir) == runs["raw_before"]


def test_runs_are_catalogued(runs, diffraction_sample):
    records = SQLiteCatalogue(runs["catalogue"]).list()
    assert [r.id for r in records] == [
        runs["threads"]["catalogue_id"],
        runs["default"]["catalogue_id"],
        runs["small_chunks"]["catalogue_id"],
    ]
    record = records[1]
    assert record.status == "completed" and record.technique == "diffraction"
    assert record.raw_dataset == str(diffraction_sample.raw_dataset_dir)
    assert (record.proposal, record.beamline, record.sample_name) == ("ih0001", "id00", "CeO2")
    assert record.flow_run_id == runs["default"]["flow_run_id"]
    assert record.outputs == runs["default"]["outputs"]
    assert record.frames == 12 and record.duration_s > 0
    assert record.parameters["chunk_size"] is None


def test_runs_are_recorded_by_the_prefect_server(runs):
    api = os.environ["PREFECT_API_URL"]
    run_id = runs["small_chunks"]["flow_run_id"]
    request = urllib.request.Request(f"{api}/flow_runs/{run_id}", headers=prefect_auth_headers())
    with urllib.request.urlopen(request) as response:
        flow_run = json.load(response)
    assert flow_run["state"]["type"] == "COMPLETED"
    request = urllib.request.Request(
        f"{api}/task_runs/filter",
        data=json.dumps({"flow_runs": {"id": {"any_": [run_id]}}}).encode(),
        headers={"Content-Type": "application/json", **prefect_auth_headers()},
    )
    with urllib.request.urlopen(request) as response:
        names = sorted(t["task_key"].split("-")[0] for t in json.load(response))
    assert names.count("integrate_chunk") == 3
    assert {"make_plan", "write_integrated_nexus", "register_processed_dataset"} <= set(names)
    request = urllib.request.Request(
        f"{api}/artifacts/filter",
        data=json.dumps({"artifacts": {"flow_run_id": {"any_": [run_id]}}}).encode(),
        headers={"Content-Type": "application/json", **prefect_auth_headers()},
    )
    with urllib.request.urlopen(request) as response:
        artifacts = json.load(response)
    [progress] = [a for a in artifacts if a["type"] == "progress"]
    assert progress["data"] == 100.0


def test_real_ceo2_pilatus_image_matches_the_reference(test_data, tmp_path):
    """The up-down flipped CeO2 image (Dioptas convention) against Dioptas' own pattern."""
    xrd = test_data / "xrd"
    parameters = DiffractionParameters(
        poni=str(xrd / "CeO2_Pilatus1M.poni"), npt=1512, unit="2th_deg", flip="ud"
    )
    summary = run_flow(xrd / "CeO2_Pilatus1M.tif", parameters, workers=1, output=str(tmp_path))
    pattern = np.loadtxt(tmp_path / "CeO2_Pilatus1M_0001_detector.xy")
    reference = np.loadtxt(xrd / "CeO2_Pilatus1M.xy")
    np.testing.assert_allclose(pattern[:, 0], reference[:, 0], atol=1e-6)
    correlation = np.corrcoef(pattern[:, 1], reference[:, 1])[0, 1]
    assert correlation >= 0.999

    def strongest_peaks(intensity):
        peaks, properties = find_peaks(intensity, prominence=0)
        return np.sort(peaks[np.argsort(properties["prominences"])[-10:]])

    offsets = strongest_peaks(pattern[:, 1]) - strongest_peaks(reference[:, 1])
    assert np.abs(offsets).max() <= 1
    assert summary["frames"] == 1


CCD_PONI = """# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis
PixelSize1: 0.0001
PixelSize2: 0.0001
Distance: 0.1
Poni1: 0.0512
Poni2: 0.0498
Rot1: 0.01
Rot2: -0.005
Rot3: 0.0
SplineFile: {spline}
"""


@pytest.fixture(scope="module")
def ccd_calibration(tmp_path_factory):
    """A CCD with distortion, as pyFAI-calib left its calibration (a FReLoN's, say): a
    version 1 PONI file with pixel sizes, the distortion spline beside it named by its
    file name alone, and no wavelength; and a CeO2 image at 0.5 Å that the distortion
    moves by up to 3 pixels. Returns the PONI file, the image and CeO2's 2θ (deg)."""
    import fabio
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import Detector
    from pyFAI.spline import Spline

    folder = tmp_path_factory.mktemp("ccd")
    spline = Spline()
    spline.zeros(xmin=0.0, ymin=0.0, xmax=1024.0, ymax=1024.0, pixSize=100.0)
    spline.grid, spline.pixelSize = 2500.0, (100.0, 100.0)
    rows, columns = np.indices(spline.xDispArray.shape)
    spline.xDispArray = (3.0 * np.sin(columns / 1024 * np.pi)).astype(np.float32)
    spline.yDispArray = (-2.0 * np.cos(rows / 1024 * np.pi)).astype(np.float32)
    spline.array2spline(smoothing=1000)
    spline.write(str(folder / "ccd.spline"))
    (folder / "ccd.poni").write_text(CCD_PONI.format(spline="ccd.spline"))
    (folder / "ccd_flat.poni").write_text(CCD_PONI.format(spline="None"))

    integrator = AzimuthalIntegrator(
        dist=0.1, poni1=0.0512, poni2=0.0498, rot1=0.01, rot2=-0.005, wavelength=0.5e-10,
        detector=Detector(splinefile=str(folder / "ccd.spline")),
    )  # fmt: skip
    calibrant = get_calibrant("CeO2")
    calibrant.wavelength = integrator.wavelength
    rings = calibrant.fake_calibration_image(integrator, Imax=1.0, Imin=0.0, resolution=0.02)
    image = folder / "ccd_CeO2.edf"
    fabio.edfimage.EdfImage(data=(50 + 1000 * rings).astype(np.float32)).write(str(image))
    return folder / "ccd.poni", image, np.degrees(calibrant.get_2th()[:4])


def ring_offsets(two_theta: np.ndarray, intensity: np.ndarray, rings: np.ndarray) -> np.ndarray:
    """How far (deg) the pattern's peak nearest each of ``rings`` lies from it."""
    peaks, _ = find_peaks(np.nan_to_num(intensity), prominence=np.nanmax(intensity) * 0.05)
    found = two_theta[peaks]
    return np.array([found[np.argmin(np.abs(found - ring))] - ring for ring in rings])


def test_an_old_poni_file_with_its_distortion_spline_beside_it(ccd_calibration, tmp_path):
    """The spline is found beside the PONI file (pyFAI looks in the working folder, which
    is not the run's) and applied: the rings land on CeO2's angles, which the same
    geometry without the spline misses by ~0.1 deg. With no wavelength the run goes in
    2θ; in q it is refused, naming what to add."""
    import fabio

    from calypso.errors import ParameterError
    from calypso.tasks.plans.diffraction import make_integration_plan

    poni, image, rings = ccd_calibration
    parameters = DiffractionParameters(poni=str(poni), unit="2th_deg", npt=2000)
    summary = run_flow(image, parameters, workers=1, output=str(tmp_path))
    path, group = summary["outputs"][0].split("::")
    with h5py.File(path) as h5:
        pattern = h5[group]
        two_theta, intensity = pattern[pattern.attrs["axes"][-1]][()], pattern["intensity"][()]
    assert np.abs(ring_offsets(two_theta, intensity.ravel(), rings)).max() < 0.02

    flat = load_geometry(DiffractionParameters(poni=str(poni.with_name("ccd_flat.poni"))))
    integrator = AzimuthalIntegrator().set_config(flat.as_pyfai_config())
    without = integrator.integrate1d(fabio.open(str(image)).data, 2000, unit="2th_deg")
    assert np.abs(ring_offsets(without.radial, without.intensity, rings)).max() > 0.08

    with pytest.raises(ParameterError, match=r"has no wavelength, and unit q_nm\^-1 .*2th_deg"):
        make_integration_plan(
            str(image), DiffractionParameters(poni=str(poni)), None, str(tmp_path)
        )


def test_an_eigers_gap_and_defective_pixels_are_left_out(test_data, tmp_path):
    """An Eiger writes 2^32 - 1 (its type's largest value) in its gaps and defective
    pixels: 6.6% of this real BioCAT Eiger2 9M vacuum frame. Counted, they made every bin
    ~10^8; left out as pyFAI's dummy, the run gives a direct pyFAI integration with
    those pixels masked. The same through an Eiger master file linking its data files."""
    import hdf5plugin  # noqa: F401

    data = test_data / "xrd" / "biocat_eiger" / "vac_007_data_000001.h5"
    poni = tmp_path / "eiger.poni"
    poni.write_text(
        "PixelSize1: 7.5e-5\nPixelSize2: 7.5e-5\nDistance: 3.66869\nPoni1: 0.1828\n"
        "Poni2: 0.1837\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1.0332e-10\n"
    )  # the geometry of its settings file (RAW's beam centre, in metres)
    summary = run_flow(data, DiffractionParameters(poni=str(poni)), workers=1, output=str(tmp_path))
    path, group = summary["outputs"][0].split("::")
    with h5py.File(path) as h5:
        intensity = h5[group]["intensity"][()]
    with h5py.File(data) as h5:
        frame = h5["entry/data/data"][0]
    invalid = frame == np.iinfo(np.uint32).max
    assert 0.05 < invalid.mean() < 0.08
    integrator = AzimuthalIntegrator().set_config(load_geometry(
        DiffractionParameters(poni=str(poni))
    ).as_pyfai_config())  # fmt: skip
    direct = integrator.integrate1d(
        frame, 1000, unit="q_nm^-1", mask=invalid, error_model="poisson"
    )
    np.testing.assert_allclose(intensity[0], direct.intensity, rtol=1e-4)
    assert np.nanmax(intensity) < 1  # a vacuum frame: a few hundredths of a count a pixel
    # The same frames through an Eiger master linking two data files (here the same file
    # twice): one series of four frames, the first two and the last two as above.
    for number in (1, 2):
        (tmp_path / f"vac_data_{number:06d}.h5").symlink_to(data)
    with h5py.File(tmp_path / "vac_master.h5", "w") as h5:
        for number in (1, 2):
            link = h5py.ExternalLink(f"vac_data_{number:06d}.h5", "/entry/data/data")
            h5[f"entry/data/data_{number:06d}"] = link
        # Images of the detector's size, which are not frames: a master's own datasets.
        h5["entry/instrument/detector/detectorSpecific/pixel_mask"] = np.zeros(frame.shape)
    summary = run_flow(
        tmp_path / "vac_master.h5",
        DiffractionParameters(poni=str(poni)),
        workers=1,
        output=str(tmp_path / "master"),
    )
    path, group = summary["outputs"][0].split("::")
    with h5py.File(path) as h5:
        series = h5[group]["intensity"][()]
    assert series.shape[0] == 4
    np.testing.assert_array_equal(series[:2], intensity)
    np.testing.assert_array_equal(series[2:], intensity)
