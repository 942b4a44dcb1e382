"""The tomography flow end to end: Prefect server, local Dask cluster, NeXus volume, catalogue."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

from calypso.flows.cli import main
from calypso.flows.samples.tomography import write_nxtomo_sample, write_tomography_sample
from calypso.registry import SQLiteCatalogue
from calypso.techniques.tomography import TomographyParameters
from tests.clusters import run_flow as run_on_shared_cluster

# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]


def run_flow(input_path, parameters, workers=2, output=None):
    return run_on_shared_cluster("tomography", input_path, parameters, workers, output)


def nexus_location(summary) -> tuple[Path, str]:
    path, dataset = summary["outputs"][0].split("::")
    return Path(path), dataset


def read_volume(summary) -> np.ndarray:
    path, dataset = nexus_location(summary)
    with h5py.File(path, "r") as h5:
        return h5[dataset][()]


def object_ssim(truth: np.ndarray, image: np.ndarray, radius: float, data_range: float) -> float:
    """SSIM over the disc holding the object, on the volume's grey scale ``data_range``."""
    n = truth.shape[-1]
    y, x = np.mgrid[:n, :n]
    disc = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2) <= radius + 3
    _, similarity = structural_similarity(truth, image, data_range=data_range, full=True)
    return float(similarity[disc].mean())


def contrast(image: np.ndarray) -> tuple[float, float]:
    """(object - background) / background noise, and the object's share of the field of view."""
    n = image.shape[-1]
    y, x = np.mgrid[:n, :n]
    field = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2) < 0.45 * n
    values = image[field]
    threshold = threshold_otsu(values)
    obj, background = values[values > threshold], values[values <= threshold]
    return (obj.mean() - background.mean()) / background.std(), obj.size / values.size


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, catalogue):
    """The Bliss phantom scan, reconstructed in slabs of 3 rows on 2 workers and in one slab."""
    root = tmp_path_factory.mktemp("visitor")
    sample = write_tomography_sample(root, rows=12, columns=160, projections=300, seed=3)
    slabs = run_flow(sample.raw_dataset_dir, TomographyParameters(chunk_rows=3))
    whole = run_flow(
        sample.raw_dataset_dir,
        TomographyParameters(chunk_rows=12),
        workers=1,
        output=str(tmp_path_factory.mktemp("one_slab")),
    )
    with h5py.File(sample.ground_truth, "r") as h5:
        truth = h5["volume"][()]
    return sample, slabs, whole, truth


def test_center_of_rotation_is_found_within_half_a_pixel(phantom):
    sample, slabs, _, _ = phantom
    assert slabs["center_of_rotation_method"] == "vo"
    assert slabs["center_of_rotation"] == pytest.approx(sample.geometry.center_of_rotation, abs=0.5)
    assert slabs["center_of_rotation_confidence"] > 0.5


def test_slices_match_the_phantom(phantom):
    sample, slabs, _, truth = phantom
    volume = read_volume(slabs)
    assert volume.shape == truth.shape
    data_range = float(truth.max() - truth.min())
    radius = sample.geometry.radius
    scores = [object_ssim(truth[r], volume[r], radius, data_range) for r in range(len(truth))]
    assert min(scores) >= 0.9, scores


def test_result_does_not_depend_on_slabs_or_workers(phantom):
    _, slabs, whole, _ = phantom
    assert slabs["tasks"] == 4 and whole["tasks"] == 1
    np.testing.assert_allclose(read_volume(slabs), read_volume(whole), rtol=0, atol=1e-6)


def test_volume_is_a_nexus_vds_over_slab_files(phantom):
    sample, slabs, _, _ = phantom
    path, dataset = nexus_location(slabs)
    assert path.parent == (
        sample.dataset.session_dir / "PROCESSED_DATA" / "phantom" / "phantom_0001" / "tomography"
    )
    volume_dir = Path(slabs["volume_dir"])
    assert sorted(p.name for p in volume_dir.iterdir()) == [
        f"slab_{first:05d}.h5" for first in (0, 3, 6, 9)
    ]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".calypso-partial")]
    with h5py.File(path, "r") as h5:
        entry = h5[h5.attrs["default"]]
        assert entry.name == "/3.1"  # the projection scan of the raw file
        data = entry[entry.attrs["default"]]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
        assert list(data.attrs["axes"]) == ["z", "y", "x"]
        assert data["voxel_size"].attrs["units"] == "pixel"
        assert h5[dataset].is_virtual
        assert {Path(s.file_name).parent.name for s in h5[dataset].virtual_sources()} == {
            volume_dir.name
        }
        process = entry["reconstruction"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["center_of_rotation"][()] == pytest.approx(slabs["center_of_rotation"])
        assert '"ring_removal": true' in process["configuration/data"][()].decode()
        # Links back to the raw scan resolve.
        assert entry["instrument/pco/data"].shape == (300, 12, 160)
    assert Path(slabs["png"]).stat().st_size > 10_000


def test_the_volume_moves_with_its_folder(phantom, tmp_path):
    _, slabs, _, _ = phantom
    path, dataset = nexus_location(slabs)
    moved = tmp_path / "moved"
    shutil.copytree(path.parent, moved)
    with h5py.File(moved / path.name, "r") as h5:
        np.testing.assert_array_equal(h5[dataset][()], read_volume(slabs))


def test_runs_are_in_the_catalogue(phantom, catalogue):
    _, slabs, _, _ = phantom
    record = SQLiteCatalogue(catalogue).get(slabs["catalogue_id"])
    assert record.technique == "tomography" and record.status == "completed"
    assert record.frames == 12 and record.outputs == slabs["outputs"]


def test_preview_shows_quartile_slices_and_a_center_sweep(phantom, tmp_path):
    sample, slabs, _, _ = phantom
    summary = run_flow(
        sample.raw_dataset_dir, TomographyParameters(mode="preview"), output=str(tmp_path)
    )
    assert summary["tasks"] == 1 and summary["volume_dir"] is None
    path, dataset = nexus_location(summary)
    assert path.name == "phantom_0001_preview.h5"
    with h5py.File(path, "r") as h5:
        slices = h5[dataset]
        assert slices.shape == (3, 160, 160)
        assert h5[slices.parent.name]["z"][()].tolist() == [3, 6, 9]
        sweep = h5[h5.attrs["default"]]["center_of_rotation_sweep"]
        centers = sweep["center"][()]
        assert len(centers) == 7 and sweep["data"].shape == (7, 160, 160)
        # The slice at the found centre is the same as in the full reconstruction.
        np.testing.assert_allclose(slices[1], read_volume(slabs)[6], atol=1e-6)
    assert Path(summary["png"]).is_file()


def test_preview_of_a_large_detector_is_binned(phantom, tmp_path):
    sample, _, _, _ = phantom
    summary = run_flow(
        sample.raw_dataset_dir,
        TomographyParameters(mode="preview", preview_binning=2),
        output=str(tmp_path),
    )
    path, dataset = nexus_location(summary)
    with h5py.File(path, "r") as h5:
        assert h5[dataset].shape == (3, 80, 80)
        assert h5[dataset].parent["x"][:2].tolist() == [0.5, 2.5]  # detector pixels
        # Still in 1/pixel of the detector: the body's attenuation, not twice it.
        body = h5[dataset][1][30:50, 30:50]
        assert 0.004 < np.median(body) < 0.02


def test_integer_output_and_tiff_stack(phantom, tmp_path):
    import tifffile

    sample, _, _, _ = phantom
    summary = run_flow(
        sample.raw_dataset_dir,
        TomographyParameters(output_dtype="uint16", tiff=True, rows=(4, 8)),
        output=str(tmp_path),
    )
    volume = read_volume(summary)
    assert volume.dtype == np.uint16 and volume.shape == (4, 160, 160)
    assert volume.max() > 60000  # the 99.9th percentile maps near the top
    tiffs = sorted((Path(summary["volume_dir"]) / "tiff").glob("*.tif"))
    assert [t.stem[-5:] for t in tiffs] == ["00004", "00005", "00006", "00007"]
    np.testing.assert_array_equal(tifffile.imread(tiffs[1]), volume[1])


def test_paganin_slabs_join_without_seams(phantom, tmp_path):
    """Slabs read rows around them for the phase retrieval, so slab size does not matter."""
    sample, _, _, _ = phantom
    physics = {"energy_kev": 20, "distance_m": 0.5, "pixel_size_um": 20, "delta_beta": 50}
    given = sample.geometry.center_of_rotation
    slabs, whole = (
        run_flow(
            sample.raw_dataset_dir,
            TomographyParameters(
                paganin=True, center_of_rotation=given, chunk_rows=rows, **physics
            ),
            output=str(tmp_path / f"rows{rows}"),
        )
        for rows in (3, 12)
    )
    assert slabs["center_of_rotation_method"] == "given" and slabs["tasks"] == 4
    volume = read_volume(slabs)
    # The margin (8 decay lengths of the kernel) leaves differences of ~3e-4 of the
    # local contrast, far below the noise: no seam at the slab boundaries.
    seams = np.abs(volume - read_volume(whole))
    assert seams.max() < 0.005 * volume.max() and seams.mean() < 1e-4 * volume.max()
    # ... while the phase retrieval itself changes the slices a lot (it smooths).
    absorption = read_volume(phantom[1])
    assert np.abs(volume - absorption).mean() > 20 * seams.mean()
    path, _ = nexus_location(slabs)
    with h5py.File(path, "r") as h5:
        assert h5["3.1/volume/voxel_size"][()] == 20 and h5["3.1/volume/x"].attrs["units"] == "um"
        assert h5["3.1/volume/data"].attrs["units"] == "1/cm"


def test_projections_split_over_several_scans(phantom, tmp_path):
    """The same scan written as three projection scans gives the same volume."""
    _, slabs, _, _ = phantom
    sample = write_tomography_sample(
        tmp_path / "visitor", rows=12, columns=160, projections=300, seed=3, projection_scans=3
    )
    summary = run_flow(sample.raw_dataset_dir, TomographyParameters())
    assert summary["center_of_rotation"] == pytest.approx(slabs["center_of_rotation"], abs=1e-6)
    np.testing.assert_allclose(read_volume(summary), read_volume(slabs), rtol=0, atol=1e-6)
    path, _ = nexus_location(summary)
    with h5py.File(path, "r") as h5:
        assert "scans 1, 2, 3, 4, 5, 6" in h5["3.1/reconstruction/provenance/data"][()].decode()


def test_nxtomo_input(tmp_path, catalogue):
    geometry = write_nxtomo_sample(tmp_path / "scan.nx")
    summary = run_flow(tmp_path / "scan.nx", TomographyParameters(), output=str(tmp_path / "out"))
    assert summary["center_of_rotation"] == pytest.approx(geometry.center_of_rotation, abs=0.5)
    assert read_volume(summary).shape == (8, 128, 128)


def test_real_tooth_data_exchange(test_data, tmp_path, capsys, catalogue):
    """tomopy's tooth (APS, Data Exchange): 181 projections of 2 rows."""
    code = main(
        ["run", "tomography", str(test_data / "tomo" / "tooth.h5"), "--output", str(tmp_path)]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    with h5py.File(tmp_path / "tooth.h5", "r") as h5:
        volume = h5["entry/volume/data"][()]
        center = h5["entry/reconstruction/center_of_rotation"][()]
    assert volume.shape == (2, 640, 640)
    # The sinogram's centre of mass gives 296.2 px; Vo's metric 295.1.
    assert 293 < center < 299
    for image in volume:
        ratio, share = contrast(image)
        assert ratio > 5 and 0.05 < share < 0.6, (ratio, share)


def test_real_tiff_stack(test_data, tmp_path, capsys, catalogue):
    """Diamond I13 TIFF projections with separate dark and flat; angles from the parameters."""
    folder = test_data / "tomo" / "image_test"
    code = main(["run", "tomography", str(folder), "--output", str(tmp_path / "none")])
    _, err = capsys.readouterr()
    assert code == 3 and "no rotation angles" in err and "angles=" in err
    assert not (tmp_path / "none").exists()
    code = main(
        [
            "run", "tomography", str(folder), "--set", "angles=[-88.2, 91.8]",
            "--output", str(tmp_path / "out"), "--json",
        ]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    with h5py.File(tmp_path / "out" / "image_test.h5", "r") as h5:
        volume = h5["entry/volume/data"]
        assert volume.shape == (135, 160, 160)
        slices = volume[110], volume[120]  # through the sample, below the dense grain
    for image in slices:
        ratio, share = contrast(image)
        assert ratio > 5 and 0.1 < share < 0.6, (ratio, share)


# -- bad input ------------------------------------------------------------------------


@pytest.fixture
def small_nxtomo(tmp_path):
    path = tmp_path / "scan.nx"
    write_nxtomo_sample(path, rows=4, columns=64, projections=91)
    return path


def refused(args: list[str], capsys) -> tuple[int, str]:
    code = main(["run", "tomography", *args])
    return code, capsys.readouterr().err


def test_no_flats_is_refused(small_nxtomo, tmp_path, capsys, catalogue):
    with h5py.File(small_nxtomo, "a") as h5:
        keys = h5["entry0000/instrument/detector/image_key_control"]
        keys[keys[()] == 1] = 2  # every flat becomes a dark
    out = tmp_path / "out"
    code, err = refused([str(small_nxtomo), "--output", str(out)], capsys)
    assert code == 3 and "no flat-field images" in err and str(small_nxtomo) in err
    assert not out.exists()


def test_angles_not_matching_frames_are_refused(small_nxtomo, tmp_path, capsys, catalogue):
    with h5py.File(small_nxtomo, "a") as h5:
        angles = h5["entry0000/sample/rotation_angle"][()]
        del h5["entry0000/sample/rotation_angle"]
        h5["entry0000/sample/rotation_angle"] = angles[:-3]
    code, err = refused([str(small_nxtomo), "--output", str(tmp_path / "out")], capsys)
    assert code == 3 and "rotation_angle has" in err and "values for" in err
    assert not (tmp_path / "out").exists()


def test_rows_outside_the_detector_are_refused(small_nxtomo, tmp_path, capsys, catalogue):
    code, err = refused(
        [str(small_nxtomo), "--set", "rows=[2, 40]", "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "beyond the detector, which has 4 rows" in err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_raw_file_fails_the_run_cleanly(tmp_path, capsys, catalogue, on_shared_cluster):
    """A Lima file that is corrupt (not missing) passes the checks and fails mid-run."""
    sample = write_tomography_sample(tmp_path / "visitor", rows=8, columns=64, projections=90)
    lima = sample.raw_dataset_dir / "scan0003" / "pco_0000.h5"
    data = bytearray(lima.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(4096)
    lima.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = refused(
        [str(sample.raw_dataset_dir), "--set", "chunk_rows=2", "--output", str(out)], capsys
    )
    assert code == 3 and "cannot be read" in err and str(sample.raw_dataset_dir) in err
    # Only the run's hidden part folder stays (for a retry of the same run): nothing
    # that looks like a result.
    if out.exists():
        assert all(p.name.startswith(".calypso-partial-") for p in out.iterdir())
    failed = [r for r in SQLiteCatalogue(catalogue).list() if r.status == "failed"]
    assert failed and failed[-1].technique == "tomography"


def test_gridrec_without_tomopy_is_refused(small_nxtomo, tmp_path, capsys, catalogue):
    pytest.importorskip("numba")
    from calypso.techniques.tomography import tomopy_available

    if tomopy_available():
        pytest.skip("tomopy is installed here")
    code, err = refused(
        [str(small_nxtomo), "--set", "algorithm=gridrec", "--output", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and "tomopy" in err and "algorithm=fbp" in err


def test_sample_data_and_parameters_from_the_cli(tmp_path, capsys):
    assert main(["sample-data", "tomography", str(tmp_path), "--size", "4", "64", "60"]) == 0
    out = capsys.readouterr().out
    assert "true centre of rotation 38.80 px" in out and "--set mode=preview" in out
    with h5py.File(tmp_path / "tomography_ground_truth.h5", "r") as h5:
        assert h5["volume"].shape == (4, 64, 64)
    assert main(["parameters", "tomography"]) == 0
    listed = capsys.readouterr().out
    for name in ("center_of_rotation", "ring_removal", "paganin", "algorithm", "mode"):
        assert name in listed
