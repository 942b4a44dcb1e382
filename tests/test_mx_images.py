"""MX images other than CBF: ADSC's SMV (``.img``), read with its header's geometry in
the convention DIALS reads it by (millimetres; ``BEAM_CENTER_X`` along the slow axis)."""

from __future__ import annotations

from pathlib import Path

import fabio
import fabio.tifimage
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.cli import main
from calypso.tasks.raw.mx_images import cbf_header, open_mx_scans
from calypso.techniques.mx import MXParameters
from tests.clusters import run_flow
from tests.test_mx_flow import spot_table

pytestmark = pytest.mark.usefixtures("on_shared_cluster")


def write_adsc(path: Path, image: np.ndarray, geometry: dict, **extra: object) -> None:
    """An ADSC SMV image: a 512-byte text header, then little-endian unsigned shorts."""
    pixel_mm = geometry["pixel_size_um"] / 1000
    fields = {
        "HEADER_BYTES": 512, "DIM": 2, "BYTE_ORDER": "little_endian",
        "TYPE": "unsigned_short", "SIZE1": image.shape[1], "SIZE2": image.shape[0],
        "PIXEL_SIZE": pixel_mm, "TIME": 1.0, "DISTANCE": geometry["distance_m"] * 1000,
        "OSC_START": 90.0, "OSC_RANGE": 0.0, "TWOTHETA": 0.0,
        "WAVELENGTH": geometry["wavelength_a"],
        "BEAM_CENTER_X": geometry["beam_y_px"] * pixel_mm,  # Mosflm's X: the slow axis
        "BEAM_CENTER_Y": geometry["beam_x_px"] * pixel_mm,
    } | extra  # fmt: skip
    header = "{\n" + "".join(f"{key}={value};\n" for key, value in fields.items()) + "}\n"
    path.write_bytes(header.encode().ljust(512) + image.astype("<u2").tobytes())


@pytest.fixture(scope="module")
def thaumatin(test_data):
    """The real Pilatus still as CBF, and its pixels and geometry as an ADSC image."""
    cbf = test_data / "mx" / "thau_3_2_0001.cbf.bz2"
    return cbf, fabio.open(str(cbf)).data, cbf_header(cbf)


def test_an_adsc_image_reads_its_geometry_and_finds_the_spots_of_the_same_pixels(
    thaumatin, tmp_path, catalogue
):
    cbf, image, geometry = thaumatin
    smv = tmp_path / "thau_1_001.img"
    write_adsc(smv, np.clip(image, 0, 65535), geometry)
    (scan,), _ = open_mx_scans(smv, MXParameters(), None)
    assert scan.geometry.model_dump() == pytest.approx(
        {name: geometry[name] for name in scan.geometry.model_dump()}
    )
    assert scan.saturation == 65535 and scan.oscillation == (90.0, 0.0)
    # The CBF's gaps (negative) are zeros in the SMV, and two pixels are above 65535:
    # masked in both, the two give the same spots.
    mask = tmp_path / "mask.npy"
    np.save(mask, ((image < 0) | (image >= 65535)).astype(np.int8))
    spots = []
    for raw in (smv, cbf):
        summary = run_flow("mx", raw, MXParameters(mask=str(mask)), 1, str(tmp_path / raw.stem))
        spots.append(spot_table(summary))
    assert len(spots[0]["x"]) > 100
    for name, values in spots[1].items():
        np.testing.assert_array_equal(spots[0][name], values)


def test_adsc_images_on_a_two_theta_arm_or_of_dtrek_are_refused_or_asked(
    thaumatin, tmp_path, capsys, catalogue
):
    _, image, geometry = thaumatin
    small = np.clip(image[:64, :64], 0, None)
    arm = tmp_path / "arm_001.img"
    write_adsc(arm, small, geometry, TWOTHETA=15.0)
    with pytest.raises(RawDataError, match="two-theta arm .TWOTHETA 15.0 deg"):
        open_mx_scans(arm, MXParameters(), None)
    dtrek = tmp_path / "dtrek_001.img"
    write_adsc(dtrek, small, geometry, DTREK_DATE_TIME="2005-03-15")
    code = main(["run", "mx", str(dtrek), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3 and "--set beam_x_px=VALUE" in err and str(dtrek) in err


def test_images_without_a_known_header_run_with_the_geometry_given(
    thaumatin, tmp_path, capsys, catalogue
):
    """A MarCCD/Rayonix image (a TIFF, read by fabio): its header's geometry is not read
    here, so the run asks for it, then gives the CBF's spots with the CBF's geometry."""
    cbf, image, geometry = thaumatin
    mccd = tmp_path / "thau_001.mccd"
    fabio.tifimage.TifImage(data=image).write(str(mccd))
    code = main(["run", "mx", str(mccd), "--output", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 3 and "no beam_x_px, beam_y_px, distance_m" in err and str(mccd) in err
    given = {name: geometry[name] for name in ("beam_x_px", "beam_y_px", "distance_m")}
    given |= {name: geometry[name] for name in ("wavelength_a", "pixel_size_um")}
    spots = [
        spot_table(run_flow("mx", raw, MXParameters(**given), 1, str(tmp_path / raw.stem)))
        for raw in (mccd, cbf)
    ]
    assert len(spots[0]["x"]) > 100
    for name, values in spots[1].items():
        np.testing.assert_array_equal(spots[0][name], values)
