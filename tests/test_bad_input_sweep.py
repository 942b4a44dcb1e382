"""Mistakes and damaged inputs found by the bad-input sweep of session 36 (143 cases over
the four techniques): each was a traceback, a complete-looking wrong result or a message
that pointed elsewhere. Each is now a one-line refusal that says what to do."""

from __future__ import annotations

import json
import os
import shutil
import socket

import h5py
import numpy as np
import pytest

from calypso.errors import ParameterError, RawDataError
from calypso.flows.api import build_parameters
from calypso.flows.cli import main
from calypso.flows.samples.mx import write_mx_sample
from calypso.registry import SQLiteCatalogue
from calypso.tasks.raw.frames import image_files_source
from calypso.tasks.raw.mx_images import open_mx_scans
from calypso.tasks.raw.projections import open_tomography_scan, read_projection_rows
from calypso.tasks.raw.spectrum_files import read_columns, read_xdi
from calypso.techniques.mx import MXParameters
from calypso.techniques.tomography import TomographyParameters
from tests.processes import run


@pytest.mark.parametrize(
    ("technique", "assignments", "expected"),
    [
        ("diffraction", ["method=foo"], "pyFAI has no method ['bbox', 'foo', 'cython'] here"),
        ("tomography", ["filter_name=hanning"], "'hanning' is not a window fbp knows: hann,"),
        ("tomography", ["angles=[0, 0]"], "the first and last projection angles must differ"),
        ("spectroscopy", ["kmin=12", "kmax=3"], "kmin=12.0 is not below kmax=3.0"),
        ("mx", ["min_spot_size=50", "max_spot_size=5"], "no spot could be kept"),
        # From a user's walk through the docs (session 42): once taken without a word.
        ("diffraction", ["radial_range=[10, 1]"], "the first bound must be below the second"),
        ("diffraction", ["azimuth_range=[0, 400]"], "an azimuth range lies within one turn"),
        ("diffraction", ["error_model=gauss"], "'poisson', 'azimuthal', 'hybrid', 'none'"),
        ("spectroscopy", ["edge=Q"], "'Q' is no absorption edge: give K, L1, L2, L3"),
    ],
)
def test_parameters_that_would_give_an_empty_or_silent_result_are_refused(
    technique, assignments, expected
):
    with pytest.raises(ParameterError) as refused:
        build_parameters(technique, assignments)
    message = str(refused.value)
    assert expected in message and "Value error" not in message and "\n" not in message


def test_a_truncated_image_is_named_not_a_traceback(test_data, tmp_path):
    whole = (test_data / "xrd" / "CeO2_Pilatus1M.tif").read_bytes()
    cut = tmp_path / "CeO2_cut.tif"
    cut.write_bytes(whole[: len(whole) // 2])  # the header whole, half the pixels
    with pytest.raises(RawDataError, match=r"CeO2_cut.tif lies partly beyond the file's end"):
        image_files_source([cut])


@pytest.fixture
def tooth(test_data, tmp_path):
    copy = tmp_path / "tooth.h5"
    shutil.copy(test_data / "tomo" / "tooth.h5", copy)
    return copy


def test_damaged_tomography_angles_and_pixels_are_named(tooth, tmp_path):
    parameters = TomographyParameters()
    with h5py.File(tooth, "a") as h5:
        original = h5["exchange/theta"][()]
        h5["exchange/theta"][...] = original[[0, 2, 1, *range(3, len(original))]]  # swapped
    with pytest.raises(RawDataError, match=r"from projection 1 to 2 they go 1.989 -> 0.9945 deg"):
        open_tomography_scan(tooth, parameters)
    with h5py.File(tooth, "a") as h5:
        h5["exchange/theta"][...] = np.where(np.arange(len(original)) == 50, np.nan, original)
    with pytest.raises(RawDataError, match="1 rotation angles are NaN or infinite .first: projec"):
        open_tomography_scan(tooth, parameters)
    with h5py.File(tooth, "a") as h5:
        h5["exchange/theta"][...] = original
        h5["exchange/data"][10, 1, :5] = np.inf  # would spread through the filter
    scan = open_tomography_scan(tooth, parameters)
    with pytest.raises(RawDataError, match="rows 0-1: 5 pixels are NaN or infinite .first: frame"):
        read_projection_rows(scan, 0, 2)
    assert read_projection_rows(scan, 0, 1).shape == (181, 1, 640)  # rows=[0,1] leaves them out
    # Inside a run: refused, and no empty scratch folder left in the output folder.
    output = tmp_path / "out"
    assert main(["run", "tomography", str(tooth), "--output", str(output)]) == 3
    assert not output.exists() or not any(output.iterdir())


def test_a_cut_column_file_says_so(test_data, tmp_path):
    lines = (test_data / "xas" / "fe_metal_rt.xdi").read_text().splitlines()
    cut = tmp_path / "fe_cut.xdi"
    cut.write_text("\n".join([*lines[:60], lines[60].rsplit(maxsplit=1)[0], *lines[61:]]) + "\n")
    with pytest.raises(RawDataError) as refused:
        read_xdi(cut, cut.read_text().splitlines())
    assert "a row is cut short" in str(refused.value) and "usecols" not in str(refused.value)


@pytest.mark.parametrize("name", ["se_na2so4_rt.xdi", "beamlines/APS13ID_2008.dat"])
def test_a_column_file_cut_inside_its_last_value_is_refused(test_data, tmp_path, name):
    """A file cut inside its last value reads as numbers: its last row is refused, not
    taken as a point of the spectrum; a complete file without a final line end is read."""
    original = test_data / "xas" / name
    text = original.read_text().rstrip()
    whole = tmp_path / f"whole{original.suffix}"
    whole.write_text(text)  # complete, but no line end after its last row
    read_back = read_columns(whole)[0]
    for label, column in read_columns(original)[0].items():
        np.testing.assert_array_equal(read_back[label], column)
    cut = tmp_path / f"cut{original.suffix}"
    cut.write_text(text[: text.rindex(" ") + 2])  # the last value's first character only
    with pytest.raises(RawDataError) as refused:
        read_columns(cut)
    assert "its last row looks cut" in str(refused.value)


def test_an_mx_scan_still_being_written_or_without_positions(tmp_path):
    sample = write_mx_sample(tmp_path, grid=(2, 3), modules=(1, 1), module=(64, 128))
    raw_file = sample.dataset.raw_file
    with h5py.File(raw_file, "a") as h5:
        h5["1.1/measurement/sy"][...] = np.nan  # an encoder that dropped out
    (scan,), _ = open_mx_scans(raw_file, MXParameters(), None)
    assert "sy" not in scan.motors and "sz" in scan.motors
    with h5py.File(raw_file, "a") as h5:
        del h5["1.1/end_time"]
    with pytest.raises(RawDataError, match="scan 1 .* has no end_time, so Bliss is still writ"):
        open_mx_scans(raw_file, MXParameters(), None)


def test_diffraction_inputs_that_are_no_images(test_data, tmp_path, capsys):
    poni = test_data / "xrd" / "CeO2_Pilatus1M.poni"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["run", "diffraction", str(empty), "--set", f"poni={poni}", "--output", "o"])
    assert code == 3 and f"{empty} holds no images (" in capsys.readouterr().err


def test_a_frame_without_a_finite_pixel_is_reported(
    test_data, tmp_path, capsys, catalogue_path, on_shared_cluster
):
    """A frame of NaN (a beam dump, a detector that wrote nothing) integrates to a pattern
    of zeros: the run says so rather than averaging it in unsaid."""
    import fabio

    image = fabio.open(str(test_data / "xrd" / "CeO2_Pilatus1M.tif")).data.astype(np.float32)
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/data/data"] = np.stack([image, np.full_like(image, np.nan), image])
    poni = test_data / "xrd" / "CeO2_Pilatus1M.poni"
    arguments = ["--set", f"poni={poni}", "--output", str(tmp_path / "out"), "--json"]
    assert main(["run", "diffraction", str(path), *arguments]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert any(
        "1 frames hold no finite pixel (first: scan 1 frame 1)" in w for w in summary["warnings"]
    )


# -- the other entry points (second sweep: 181 commands) ------------------------------


def test_a_result_never_replaces_a_raw_file(
    test_data, tmp_path, capsys, catalogue_path, on_shared_cluster
):
    """--output given as the input's own folder: the result (frames.h5) would have
    replaced the raw file of that name. The raw file stays as it was."""
    folder = tmp_path / "beamtime"
    folder.mkdir()
    raw = folder / "vac_007_data_000001.h5"
    shutil.copy(test_data / "xrd" / "biocat_eiger" / raw.name, raw)
    before = raw.read_bytes()
    poni = tmp_path / "eiger.poni"
    poni.write_text(
        "PixelSize1: 7.5e-5\nPixelSize2: 7.5e-5\nDistance: 3.66869\nPoni1: 0.1828\n"
        "Poni2: 0.1837\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1.0332e-10\n"
    )
    code = main(["run", "diffraction", str(raw), "--set", f"poni={poni}", "--output", str(folder)])
    # The folder holds a file of the result's name that no record holds: the result goes
    # beside it, in the next version (it was refused before the versions looked on disk).
    assert code == 0 and raw.read_bytes() == before
    [record] = SQLiteCatalogue(catalogue_path).list()
    assert record.status == "completed" and record.processed_path == f"{folder}_v2"
    # Had the file come between the choice of the folder and the publication, the
    # publication itself refuses to replace it.
    from calypso.errors import OutputError
    from calypso.tasks.writers.publication import _refuse_foreign

    with pytest.raises(OutputError, match="which Calypso did not write"):
        _refuse_foreign(raw)
    inside = tmp_path / "ih0001" / "id00" / "20261206" / "RAW_DATA" / "s" / "s_0001"
    with pytest.raises(ParameterError, match="is inside a RAW_DATA folder"):
        from calypso.tasks.raw.data_policy import output_folder

        output_folder(str(raw), None, "diffraction", str(inside), None)


def test_commands_that_would_delete_or_overwrite_what_is_not_theirs(tmp_path, capsys):
    from calypso.errors import ConfigurationError
    from calypso.flows.online.submissions import serve_submissions
    from calypso.settings import CalypsoSettings
    from calypso.tasks.export.transfer import check_target_uri, open_target

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["demo", "--directory", str(mine)]) == 2
    assert "holds what calypso demo did not write" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # A socket path naming a regular file: the service takes no submissions, the file stays.
    important = tmp_path / "important.txt"
    important.write_text("kept")
    settings = CalypsoSettings(serve={"socket": str(important)})
    assert serve_submissions(settings) is None and important.read_text() == "kept"
    with pytest.raises(ConfigurationError, match="inside a RAW_DATA folder"):
        check_target_uri(str(tmp_path / "v" / "RAW_DATA" / "x"))
    with pytest.raises(ConfigurationError, match="cannot be opened .Protocol not known: bogus"):
        open_target("bogus://x/y", CalypsoSettings().export)
    assert main(["server", "--port", "99999"]) == 2
    assert "99999 is not a port number (1-65535)" in capsys.readouterr().err
    # A second sample into the same tree: the first dataset's files are not rewritten.
    assert main(["sample-data", "spectroscopy", str(tmp_path / "tree")]) == 0
    written = {p: p.read_bytes() for p in (tmp_path / "tree").rglob("*") if p.is_file()}
    assert main(["sample-data", "spectroscopy", str(tmp_path / "tree"), "--seed", "3"]) == 4
    assert "holds a dataset already: a sample never writes over one" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in written} == written


def test_a_result_changed_since_its_record_is_not_exported(
    test_data, tmp_path, capsys, catalogue_path, on_shared_cluster
):
    out = tmp_path / "fe"
    spectrum = test_data / "xas" / "fe_metal_rt.xdi"
    assert main(["run", "spectroscopy", str(spectrum), "--output", str(out)]) == 0
    [record] = SQLiteCatalogue(catalogue_path).list()
    capsys.readouterr()
    [result] = out.glob("*.h5")
    with open(result, "r+b") as stream:  # a disk or a copy lost its end
        stream.truncate(1000)
    code = main(["export", str(record.id), "--to", str(tmp_path / "copy")])
    assert code != 0 and f"changed {result.name} since catalogue record" in capsys.readouterr().err
    assert not (tmp_path / "copy").exists()


def test_a_live_run_refused_says_so_in_one_line(diffraction_sample, tmp_path, capsys):
    """A live run that cannot follow its scan prints Calypso's refusal only: Prefect's
    console log of the flow's exception (a traceback) is quiet, as for other runs."""
    raw, poni = diffraction_sample.raw_dataset_dir, diffraction_sample.calibration["poni"]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens on it once closed
    env = {**os.environ, "CALYPSO_HOME": str(tmp_path / "home")}
    for name in ("CALYPSO_CATALOGUE__PATH", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        env.pop(name, None)  # the tests' console level: the command's own, as a user has it
    arguments = ["run", "diffraction", str(raw), "--set", f"poni={poni}"]
    arguments += ["--output", str(tmp_path / "out"), "--stall-timeout", "5"]
    ran = run([*arguments, "--live", f"redis://127.0.0.1:{port}"], env, timeout=180)
    assert ran.returncode == 3, ran.stderr[-3000:]
    assert ran.stderr.strip().splitlines() == [
        f"calypso: error: no blissdata server answers at redis://127.0.0.1:{port} "
        f"(Error 111 connecting to 127.0.0.1:{port}. Connection refused.): start it (Bliss's "
        "Redis with RedisJSON and RediSearch), or follow the growing files instead "
        "(--live files)"
    ]
    assert main([*arguments, "--live", "http://example.invalid"]) == 2
    assert "argument --live: 'http://example.invalid': give 'files'" in capsys.readouterr().err


def test_a_flow_registry_this_account_cannot_write_is_one_line(tmp_path, monkeypatch):
    """Another account's registry file (0644) refused the write with sqlite's traceback.
    Here as root, which SQLite lets write anything, the refusal is sqlite's own error."""
    import contextlib

    import calypso.registry.saved_flows as saved_flows
    from calypso.errors import CatalogueError
    from calypso.registry.access import Identity

    alice = Identity("alice", "ldap", proposals={"ih0001"})
    registry = saved_flows.SavedFlows(tmp_path / "catalogue.sqlite")
    opened = saved_flows.connect

    def read_only(path):
        with opened(path) as db:
            db.execute("PRAGMA query_only = ON")  # sqlite: "attempt to write a readonly database"
            yield db

    monkeypatch.setattr(saved_flows, "connect", contextlib.contextmanager(read_only))
    with pytest.raises(CatalogueError, match="cannot be changed by this account .attempt to write"):
        registry.save("mine", "calypso: 1\n", "diffraction", alice, None, "")


@pytest.mark.parametrize(("unit", "scale", "looks"), [("keV", 1.0, "eV"), ("eV", 0.001, "keV")])
def test_an_energy_unit_the_values_deny_is_named(test_data, tmp_path, unit, scale, looks):
    """energy_unit=keV on a spectrum in eV searched an edge at 9 MeV and ended in numpy's
    gradient, with a traceback (a helper's walk through the spectroscopy docs)."""
    from calypso.tasks.raw.absorption import energy_axis
    from calypso.techniques.spectroscopy import SpectroscopyParameters

    spectrum = test_data / "xas" / "cu_metal_rt.xdi"
    from calypso.tasks.raw.spectra import ColumnTable

    columns, metadata = read_xdi(spectrum, spectrum.read_text().splitlines())
    columns["energy"] = columns["energy"] * scale
    table = ColumnTable(str(spectrum), columns, metadata)
    with pytest.raises(RawDataError) as refused:
        energy_axis(table, SpectroscopyParameters(energy_unit=unit))
    message = str(refused.value)
    assert f"read in {unit} (energy_unit={unit}) spans" in message and "\n" not in message
    assert f"its values look like {looks}; set energy_unit={looks}" in message
    assert energy_axis(table, SpectroscopyParameters(energy_unit=looks)).max() > 8900


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"element": "Cu"}, "eV from the tabulated Cu K edge (8979.0 eV): wrong element"),
        # once "the tabulated Fe K edge (-5.0 eV)": the value given, not the table's
        ({"reference_e0": -5.0}, "eV from the reference_e0 given (-5.0 eV): wrong value"),
    ],
)
def test_a_reference_foil_far_from_its_edge_names_what_was_given(tmp_path, values, expected):
    from calypso.flows.samples.spectroscopy import write_spectroscopy_sample
    from calypso.tasks.plans.spectroscopy import make_spectroscopy_plan
    from calypso.techniques.spectroscopy import SpectroscopyParameters

    dataset = write_spectroscopy_sample(tmp_path / "visitor", repeats=1, seed=2)
    with pytest.raises(ParameterError) as refused:
        make_spectroscopy_plan(
            str(dataset.raw_dataset_dir), SpectroscopyParameters(**values), output_dir=str(tmp_path)
        )
    assert expected in str(refused.value)


def test_a_bliss_proposal_file_names_the_dataset_files_it_links_to(test_data, tmp_path, capsys):
    master = test_data / "bliss" / "id11_demoh5" / "ma4500_demoh5.h5"
    poni = test_data / "xrd" / "CeO2_Pilatus1M.poni"
    arguments = ["run", "diffraction", str(master), "--set", f"poni={poni}"]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 3
    error = capsys.readouterr().err
    assert "links to the dataset files demoh5_dataset/demoh5_dataset.h5 (Bliss's" in error
    assert "give one of them, or its folder" in error and not (tmp_path / "out").exists()
