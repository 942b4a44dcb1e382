"""Tomography scans as other facilities write them: Diamond's NXtomo, NXtomo of
projections only, APS tomoScan's Data Exchange without ``theta`` or dark images, and
image folders in other people's naming. Each is made from the real tooth (APS) or the
real Diamond I13 TIFFs, and must read as the original does."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.cli import main
from calypso.flows.samples.tomography import write_tomography_sample
from calypso.tasks.raw.projections import (
    TomographyScan,
    matching_images,
    open_tomography_scan,
    read_projection_rows,
)
from calypso.techniques.tomography import TomographyParameters


@pytest.fixture(scope="module")
def tooth(test_data):
    with h5py.File(test_data / "tomo" / "tooth.h5", "r") as h5:
        return {
            name: h5[f"exchange/{name}"][()]
            for name in ("data", "data_white", "data_dark", "theta")
        }


def scan_of(path: Path, **parameters) -> TomographyScan:
    return open_tomography_scan(path, TomographyParameters(**parameters))


def same_scan(scan: TomographyScan, reference: TomographyScan) -> None:
    assert scan.n_projections == reference.n_projections
    assert np.allclose(scan.angles_deg, reference.angles_deg)
    assert [b.n_frames for b in scan.flats] == [b.n_frames for b in reference.flats]
    assert np.array_equal(read_projection_rows(scan, 0, 2), read_projection_rows(reference, 0, 2))


def write_diamond_nxtomo(path: Path, tooth: dict, keys_dtype=np.float64) -> None:
    """Diamond's layout: an NXsubentry entry1/tomo_entry whose data/data links to the
    camera's frames (darks, flats, projections), data/rotation_angle for every frame, the
    image keys (floats) in instrument/detector, and no instrument/detector/data."""
    frames = np.concatenate([tooth["data_dark"], tooth["data_white"], tooth["data"]])
    n_before = len(tooth["data_dark"]) + len(tooth["data_white"])
    counts = [len(tooth[name]) for name in ("data_dark", "data_white", "data")]
    keys = np.repeat(np.array([2, 1, 0], dtype=keys_dtype), counts)
    with h5py.File(path, "w") as h5:
        tomo_entry = h5.create_group("entry1/tomo_entry")
        tomo_entry.attrs["NX_class"] = "NXsubentry"
        tomo_entry["definition"] = "NXtomo"
        h5["entry1/pco1_hw/data"] = frames
        tomo_entry["data/data"] = h5py.SoftLink("/entry1/pco1_hw/data")
        angles = tomo_entry.create_dataset(
            "data/rotation_angle", data=np.concatenate([np.zeros(n_before), tooth["theta"]])
        )
        angles.attrs["units"] = "degrees"
        tomo_entry["instrument/detector/image_key"] = keys


def test_diamonds_nxtomo_reads_as_the_data_exchange_file(test_data, tooth, tmp_path):
    path = tmp_path / "k11-1234.nxs"
    write_diamond_nxtomo(path, tooth)
    scan = scan_of(path)
    assert scan.layout == "nxtomo" and scan.description.endswith("::/entry1/tomo_entry")
    assert [b.n_frames for b in scan.darks] == [len(tooth["data_dark"])]
    same_scan(scan, scan_of(test_data / "tomo" / "tooth.h5"))


def test_an_nxtomo_whose_angles_are_the_projections_only(test_data, tooth, tmp_path):
    """An NXtomo entry (definition attribute) with one angle a projection, among the
    sample's transformations."""
    path = tmp_path / "scan.nx"
    write_diamond_nxtomo(path, tooth)
    with h5py.File(path, "a") as h5:
        del h5["entry1/tomo_entry/data/rotation_angle"]
        h5["entry1/tomo_entry/sample/transformations/rotation_angle"] = tooth["theta"]
    same_scan(scan_of(path), scan_of(test_data / "tomo" / "tooth.h5"))
    with h5py.File(path, "a") as h5:
        del h5["entry1/tomo_entry/sample/transformations/rotation_angle"]
        h5["entry1/tomo_entry/sample/transformations/rotation_angle"] = tooth["theta"][:-3]
    with pytest.raises(RawDataError, match="178 values for 201 frames .181 projections."):
        scan_of(path)


def test_an_nxtomo_entry_without_image_keys_is_all_projections(tooth, tmp_path):
    path = tmp_path / "projections.nx"
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["definition"] = "NXtomo"
        entry["instrument/detector/data"] = tooth["data"]
        entry["sample/rotation_angle"] = tooth["theta"]
    with pytest.raises(RawDataError, match="no flat-field images"):
        scan_of(path)
    scan = scan_of(path, flat_field=False)
    assert scan.n_projections == len(tooth["data"]) and not scan.flats and not scan.darks


def test_data_exchange_of_tomoscan_without_theta_or_dark_images(test_data, tooth, tmp_path):
    """APS tomoScan records the rotation's start, step and count, and a dark level."""
    path = tmp_path / "tomoscan_0001.h5"
    with h5py.File(path, "w") as h5:
        h5["exchange/data"] = tooth["data"]
        h5["exchange/data_white"] = tooth["data_white"]
        rotation = h5.create_group("process/acquisition/rotation")
        rotation["rotation_start"] = [0.0]
        rotation["rotation_step"] = [float(np.diff(tooth["theta"]).mean())]
        rotation["num_angles"] = [len(tooth["theta"])]
        h5["process/acquisition/dark_fields/dark_field_value"] = [105.0]
    scan = scan_of(path)
    assert np.allclose(scan.angles_deg, tooth["theta"], atol=1e-9)
    assert scan.dark_level == 105.0 and not scan.darks
    with h5py.File(path, "a") as h5:
        del h5["process/acquisition/rotation/num_angles"]
    with pytest.raises(RawDataError, match="no rotation angles"):
        scan_of(path)


def test_image_folders_in_other_peoples_naming(test_data, tmp_path):
    """Darks and flats in folders of their own (any case), neutron imaging's DF_/OB_, and
    projections numbered without zeros in front, which must be read in number order."""
    source = test_data / "tomo" / "image_test"
    tiffs = sorted((source / "tiffs").glob("*.tiff"))
    by_folder, by_prefix = tmp_path / "by_folder", tmp_path / "by_prefix"
    for folder in ("Darks", "Flats", "projections"):
        (by_folder / folder).mkdir(parents=True)
    by_prefix.mkdir()
    shutil.copy(source / "dark_00001.tiff", by_folder / "Darks" / "00001.tiff")
    shutil.copy(source / "flat_00001.tiff", by_folder / "Flats" / "00001.tiff")
    shutil.copy(source / "dark_00001.tiff", by_prefix / "DF_1.tif")
    shutil.copy(source / "flat_00001.tiff", by_prefix / "OB_1.tif")
    for number, tiff in enumerate(tiffs):
        shutil.copy(tiff, by_folder / "projections" / f"img_{number}.tiff")
        shutil.copy(tiff, by_prefix / f"proj{number}.tif")
    reference = scan_of(source, angles=(-88.2, 91.8))
    for folder in (by_folder, by_prefix):
        scan = scan_of(folder, angles=(-88.2, 91.8))
        assert len(scan.darks) == len(scan.flats) == 1
        assert (
            scan.projections[0]
            .source.files[10]
            .endswith("10.tiff" if folder == by_folder else "10.tif")
        )
        same_scan(scan, reference)
    assert [p.name for p in matching_images(by_folder, "projections/img_1*")] == [
        "img_1.tiff",
        *(f"img_{n}.tiff" for n in range(10, 20)),
    ]


def test_a_diamond_nxtomo_reconstructs_as_the_data_exchange_file(
    test_data, tooth, tmp_path, capsys, catalogue, on_shared_cluster
):
    path = tmp_path / "k11-1234.nxs"
    write_diamond_nxtomo(path, tooth, keys_dtype=np.int32)
    volumes = []
    for name, raw in (("dls", path), ("aps", test_data / "tomo" / "tooth.h5")):
        code = main(["run", "tomography", str(raw), "--output", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        (result,) = (tmp_path / name).glob("*.h5")
        with h5py.File(result, "r") as h5:
            volumes.append(h5["entry/volume/data"][()])
    assert np.array_equal(volumes[0], volumes[1])


def test_a_bliss_rotation_kept_among_the_positioners_under_another_motors_name(tmp_path):
    """The rotation of a projection scan found as a positioner (one value a frame), under
    a motor name nxtomomill knows (``hrrz_trig``), not only as a ``measurement`` channel."""
    sample = write_tomography_sample(tmp_path, rows=4, columns=64, projections=91)
    (raw_file,) = sample.raw_dataset_dir.glob("*.h5")
    reference = scan_of(raw_file)
    with h5py.File(raw_file, "a") as h5:
        angles = h5["3.1/measurement/srot"][()]
        for number in (1, 2, 3, 4):
            for group in ("measurement", "instrument/positioners"):
                if f"{group}/srot" in h5[f"{number}.1"]:
                    del h5[f"{number}.1/{group}/srot"]
        h5["3.1/instrument/positioners/hrrz_trig"] = angles
    scan = scan_of(raw_file)
    assert scan.angles_deg == reference.angles_deg and len(scan.angles_deg) == 91
