"""The MX flow end to end: Prefect server, local Dask cluster, NeXus report, catalogue."""

from __future__ import annotations

import bz2
import os
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.cli import main
from calypso.flows.samples.mx import write_mx_sample
from calypso.registry import SQLiteCatalogue
from calypso.techniques.mx import MXParameters
from tests.clusters import run_flow as run_on_shared_cluster

# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]


def run_flow(input_path, parameters, workers=2, output=None):
    return run_on_shared_cluster("mx", input_path, parameters, workers, output)


def nexus_entry(summary) -> tuple[Path, str]:
    path, dataset = summary["outputs"][0].split("::")
    return Path(path), dataset.strip("/").split("/")[0]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, catalogue):
    """The simulated grid scan reduced with the beamstop mask, and once without it."""
    sample = write_mx_sample(tmp_path_factory.mktemp("visitor"))
    masked = run_flow(sample.raw_dataset_dir, MXParameters(mask=str(sample.mask)))
    unmasked = run_flow(
        sample.raw_dataset_dir,
        MXParameters(chunk_size=4),
        workers=1,
        output=str(tmp_path_factory.mktemp("unmasked")),
    )
    return sample, masked, unmasked


def spot_table(summary) -> dict[str, np.ndarray]:
    path, entry = nexus_entry(summary)
    with h5py.File(path, "r") as h5:
        return {name: h5[f"{entry}/spots/{name}"][()] for name in ("frame", "x", "y", "d")}


def per_image(summary) -> dict[str, np.ndarray]:
    path, entry = nexus_entry(summary)
    with h5py.File(path, "r") as h5:
        group = h5[f"{entry}/per_image"]
        return {name: group[name][()] for name in ("n_spots", "d_min", "ice_rings")}


def test_spots_match_the_simulation(grid):
    """Recall and precision >= 0.95 on the frames without ice (a match: within 1.5 px)."""
    sample, masked, _ = grid
    found = spot_table(masked)
    with h5py.File(sample.ground_truth, "r") as h5:
        truth = {name: h5[name][()] for name in ("frame", "x", "y")}
    matched_true = matched_found = n_true = n_found = 0
    for frame in range(35):
        if frame in sample.ice_frames:
            continue
        t = truth["frame"] == frame
        f = found["frame"] == frame
        n_true, n_found = n_true + t.sum(), n_found + f.sum()
        if t.any() and f.any():
            distance = np.hypot(
                found["x"][f][:, None] - truth["x"][t][None, :],
                found["y"][f][:, None] - truth["y"][t][None, :],
            )
            matched_true += (distance.min(axis=0) < 1.5).sum()
            matched_found += (distance.min(axis=1) < 1.5).sum()
    assert n_true > 10_000
    assert matched_true / n_true >= 0.95 and matched_found / n_found >= 0.95


def test_centring_is_in_the_crystal_cell(grid):
    sample, masked, _ = grid
    best = masked["report"]["scans"][0]["best_position"]
    assert (best["row"], best["column"]) == sample.crystal_cell
    path, entry = nexus_entry(masked)
    with h5py.File(path, "r") as h5:
        heat = h5[f"{entry}/grid"]
        assert heat.attrs["signal"] == "n_spots" and heat["n_spots"].shape == (5, 7)
        assert h5[f"{entry}/centring/row"][()] == sample.crystal_cell[0]
        # the motor positions of that frame, for the beamline to move to
        assert h5[f"{entry}/centring/sy"][()] == pytest.approx(
            h5[f"{entry}/measurement/sy"][best["frame"]]
        )
        # the heat map on the sample's positions: sz down the rows, sy along the columns
        assert list(heat.attrs["axes"]) == ["sz", "sy"]
        sy = h5[f"{entry}/measurement/sy"][()]
        assert heat["sy"][best["column"]] == pytest.approx(sy[best["frame"]])
        assert heat["sy"].shape == (7,) and heat["sz"].shape == (5,)


def test_ice_rings_and_hits(grid):
    sample, masked, _ = grid
    table = per_image(masked)
    assert np.flatnonzero(table["ice_rings"]).tolist() == list(sample.ice_frames)
    with h5py.File(sample.ground_truth, "r") as h5:
        true_counts = np.bincount(h5["frame"][()], minlength=35)
    expected_hits = (true_counts >= 20).mean()
    assert masked["report"]["scans"][0]["hit_rate"] == pytest.approx(expected_hits, abs=0.03)
    hits = table["n_spots"] >= 100
    assert np.all((table["d_min"][hits] > 1.5) & (table["d_min"][hits] < 3.5))


def test_the_mask_removes_the_hot_pixels(grid):
    """Empty frames: the hot-pixel cluster is a spot without the mask, nothing with it."""
    sample, masked, unmasked = grid
    with h5py.File(sample.ground_truth, "r") as h5:
        true_counts = np.bincount(h5["frame"][()], minlength=35)
    empty = true_counts == 0
    assert empty.sum() >= 3
    assert np.all(per_image(masked)["n_spots"][empty] == 0)
    assert np.all(per_image(unmasked)["n_spots"][empty] == 1)


def test_nexus_report_and_catalogue(grid, catalogue):
    sample, masked, _ = grid
    path, entry = nexus_entry(masked)
    assert path.parent == (
        sample.dataset.session_dir / "PROCESSED_DATA" / "thaumatin" / "thaumatin_0001" / "mx"
    )
    with h5py.File(path, "r") as h5:
        table = h5[f"{entry}/per_image"]
        assert table.attrs["signal"] == "n_spots" and list(table.attrs["axes"]) == ["frame"]
        assert set(table.attrs["auxiliary_signals"]) == {"total_intensity", "d_min", "ice_rings"}
        spots = h5[f"{entry}/spots"]
        first = spots["first"][()]
        assert first[-1] == len(spots["x"]) and np.all(np.diff(first) == table["n_spots"][()])
        process = h5[f"{entry}/spotfinder"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert "grid scan of stills" in process["indexing"][()].decode()
    assert Path(masked["png"]).stat().st_size > 10_000
    record = SQLiteCatalogue(catalogue).get(masked["catalogue_id"])
    assert record.technique == "mx" and record.frames == 35 and record.status == "completed"


def test_real_thaumatin_images(test_data, tmp_path, catalogue):
    """Three real PILATUS3 6M stills of a thaumatin grid scan (DLS I24).

    Ranges from the data: strong stills of a well-diffracting protein crystal give
    hundreds to a few thousand spots at 0.35 m, a resolution estimate between 1.6
    and 3 Å (the detector edge is at 1.6 Å); the three images give 301, 1313 and
    1421 spots with the default parameters.
    """
    parameters = MXParameters(images="thau_*")
    first = run_flow(test_data / "mx", parameters, output=str(tmp_path / "a"))
    again = run_flow(
        test_data / "mx",
        MXParameters(images="thau_*", chunk_size=1),
        workers=1,
        output=str(tmp_path / "b"),
    )
    scan = first["report"]["scans"][0]
    assert scan["geometry"] == {
        "beam_x_px": 1261.61,
        "beam_y_px": 1306.96,
        "distance_m": 0.351,
        "wavelength_a": 0.96859,
        "pixel_size_um": 172.0,
    }  # from the CBF headers
    table, rerun = per_image(first), per_image(again)
    np.testing.assert_array_equal(table["n_spots"], rerun["n_spots"])
    np.testing.assert_array_equal(table["d_min"], rerun["d_min"])
    assert np.all((table["n_spots"] > 200) & (table["n_spots"] < 3000))
    assert np.all((table["d_min"] > 1.6) & (table["d_min"] < 3.0))
    assert "stills (no oscillation)" in first["report"]["indexing"]["message"]


def test_xia2_is_run_when_on_path(test_data, tmp_path, monkeypatch, catalogue):
    """The subprocess plumbing, with a stand-in xia2 that records its arguments.

    The real thermolysin image is from a rotation scan (0.25 deg a frame in its
    header), so it is indexable; the thaumatin stills are not.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    xia2 = bin_dir / "xia2"
    xia2.write_text('#!/bin/sh\necho "xia2 stand-in: $@"\necho "High resolution limit 1.8"\n')
    xia2.chmod(xia2.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    image = test_data / "mx" / "dlsnxs2cbf_therm_0001.cbf.gz"
    summary = run_flow(image, MXParameters(), workers=1, output=str(tmp_path / "out"))
    assert summary["report"]["scans"][0]["oscillation_deg"] == [174.0, 0.25]
    indexing = summary["report"]["indexing"]
    assert indexing["program"] == "xia2" and indexing["ran"]
    assert f"image={image}" in indexing["log_tail"] and "pipeline=dials" in indexing["log_tail"]
    assert (tmp_path / "out" / "xia2").is_dir()
    still = run_flow(
        test_data / "mx" / "thau_3_2_0001.cbf.bz2", MXParameters(), output=str(tmp_path / "s")
    )
    assert "stills (no oscillation): no indexing" in still["report"]["indexing"]["message"]


def test_eiger_master_with_data_files(grid, tmp_path, catalogue):
    """An NXmx master linking a bitshuffle-LZ4 data file, as Eiger writes them."""
    import hdf5plugin

    sample, masked, _ = grid
    with h5py.File(sample.dataset.raw_file, "r") as raw:
        frames = raw["1.1/instrument/eiger/data"][10:16]
        detector = raw["1.1/instrument/eiger"]
        names = ("beam_center_x", "beam_center_y", "detector_distance", "x_pixel_size")
        geometry = {name: detector[name][()] for name in names}
        pixel_mask = detector["pixel_mask"][()]
        wavelength = raw["1.1/instrument/beam/incident_wavelength"][()]
    with h5py.File(tmp_path / "lyso_data_000001.h5", "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, chunks=(1, *frames.shape[1:]),
                          **hdf5plugin.Bitshuffle(cname="lz4"))  # fmt: skip
    with h5py.File(tmp_path / "lyso_master.h5", "w") as h5:
        h5["entry/data/data_000001"] = h5py.ExternalLink("lyso_data_000001.h5", "/entry/data/data")
        h5["entry/data/omega"] = 30.0 + 0.1 * np.arange(6)
        for name, value in geometry.items():
            h5[f"entry/instrument/detector/{name}"] = value
        h5["entry/instrument/detector/pixel_mask"] = pixel_mask
        h5["entry/instrument/beam/incident_wavelength"] = wavelength
    summary = run_flow(
        tmp_path / "lyso_master.h5", MXParameters(mask=str(sample.mask)), output=str(tmp_path / "o")
    )
    np.testing.assert_array_equal(
        per_image(summary)["n_spots"], per_image(masked)["n_spots"][10:16]
    )
    scan = summary["report"]["scans"][0]
    assert scan["oscillation_deg"] == pytest.approx([30.0, 0.1])
    assert "no indexing program on PATH" in summary["report"]["indexing"]["message"]


@pytest.mark.parametrize("writer", ["old Eiger firmware", "Diamond"])
def test_eiger_masters_keep_their_invalid_pixels_elsewhere(writer, grid, tmp_path, catalogue):
    """Older Eiger firmware keeps the pixel mask in ``detectorSpecific`` (here the gaps
    read 5000 counts, invalid only by that mask); Diamond's masters declare 16-bit frames
    as 64-bit with no mask, the gaps at 65535 = ``saturation_value``. Either way the
    gaps must stay out of the spot finding."""
    sample, masked, _ = grid
    with h5py.File(sample.dataset.raw_file, "r") as raw:
        frames = raw["1.1/instrument/eiger/data"][10:16].astype(np.int64)
        detector = raw["1.1/instrument/eiger"]
        names = ("beam_center_x", "beam_center_y", "detector_distance", "x_pixel_size")
        geometry = {name: detector[name][()] for name in names}
        gaps = detector["pixel_mask"][()] != 0
        wavelength = raw["1.1/instrument/beam/incident_wavelength"][()]
    frames[:, gaps] = 5000 if writer == "old Eiger firmware" else 65535
    with h5py.File(tmp_path / "grid_master.h5", "w") as h5:
        h5["entry/data/data"] = frames if writer == "Diamond" else frames.astype(np.uint32)
        for name, value in geometry.items():
            h5[f"entry/instrument/detector/{name}"] = value
        if writer == "Diamond":
            h5["entry/instrument/detector/saturation_value"] = 65535
        else:
            h5["entry/instrument/detector/detectorSpecific/pixel_mask"] = gaps.astype(np.uint32)
        h5["entry/instrument/beam/incident_wavelength"] = wavelength
    summary = run_flow(
        tmp_path / "grid_master.h5", MXParameters(mask=str(sample.mask)), output=str(tmp_path / "o")
    )
    np.testing.assert_array_equal(
        per_image(summary)["n_spots"], per_image(masked)["n_spots"][10:16]
    )


# -- bad input ----------------------------------------------------------------------


def refused(args: list[str], capsys) -> tuple[int, str]:
    code = main(["run", "mx", *args])
    return code, capsys.readouterr().err


def test_a_corrupt_cbf_is_named(test_data, tmp_path, capsys, catalogue):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(test_data / "mx" / "thau_3_2_0001.cbf.bz2", folder)
    good = bz2.decompress((test_data / "mx" / "thau_3_2_0002.cbf.bz2").read_bytes())
    corrupt = folder / "thau_3_2_0002.cbf"
    corrupt.write_bytes(good[: len(good) // 3])  # a transfer cut short
    code, err = refused([str(folder), "--output", str(tmp_path / "out")], capsys)
    assert code == 3 and str(corrupt) in err
    assert not (tmp_path / "out").exists()


def test_a_missing_eiger_data_file_is_named(test_data, tmp_path, capsys, catalogue):
    """The real NXmx master of a thermolysin dataset, without its data file."""
    code, err = refused(
        [str(test_data / "mx" / "Therm_6_2.nxs"), "--output", str(tmp_path)], capsys
    )
    assert code == 3 and "Therm_6_2_000001.h5" in err and "missing" in err


def test_an_eiger_master_with_a_missing_linked_file(tmp_path, capsys, catalogue):
    master = tmp_path / "scan_master.h5"
    with h5py.File(master, "w") as h5:
        h5["entry/data/data_000001"] = h5py.ExternalLink("scan_data_000001.h5", "/entry/data/data")
    code, err = refused([str(master), "--output", str(tmp_path / "out")], capsys)
    assert code == 3 and "scan_data_000001.h5, which is missing" in err


def test_missing_geometry_is_refused_then_overridden(tmp_path, capsys, catalogue):
    sample = write_mx_sample(tmp_path / "visitor", grid=(2, 3), crystal_at=(0.5, 1.0))
    with h5py.File(sample.dataset.raw_file, "a") as h5:
        del h5["1.1/instrument/eiger/detector_distance"]
        del h5["1.1/instrument/beam"]
    code, err = refused([str(sample.raw_dataset_dir), "--output", str(tmp_path / "o")], capsys)
    assert code == 3 and "no distance_m, wavelength_a" in err
    assert "--set distance_m=VALUE --set wavelength_a=VALUE" in err
    assert str(sample.dataset.raw_file) in err
    code = main(
        ["run", "mx", str(sample.raw_dataset_dir), "--output", str(tmp_path / "o"),
         "--set", "distance_m=0.06", "--set", "wavelength_a=0.9763"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err


def test_sample_data_from_the_cli(tmp_path, capsys):
    assert main(["sample-data", "mx", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "crystal centred in cell row 2, column 4" in out and "--set mask=" in out
