"""Beamline XAS files in their native formats: read, reduced, and compared with xraylarch.

Each file of ``xas/beamlines`` is one family (SPEC, EPICS, MRCAT, LabVIEW, KEK-PF,
SSRL, XDAC, CLS, ESRF, an Athena project). Those whose header names the columns
reduce with no option; the others with only the choice Athena's column dialog asks
for. E0 and the edge step are compared with Larch's ``pre_edge`` (defaults) on the
same mu(E); the edge found is checked against the element's tabulated edge, which
checks the energy column, its unit and the mono angle conversion independently.
Most files go through the planner and the reduction directly (a second each); one
CLI run reads a folder of the files that need no option.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from calypso.errors import CalypsoError
from calypso.flows.cli import main
from calypso.tasks.plans.spectroscopy import make_spectroscopy_plan, normalization_keywords
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.spectra import read_source
from calypso.techniques import spectroscopy as xas

larch = pytest.importorskip("larch", reason="xraylarch is the reference (test extra)")
larch_xafs = pytest.importorskip("larch.xafs")
xraydb = pytest.importorskip("xraydb")

#: file -> (the options Athena's column dialog would ask for, the element of its K edge)
READABLE: dict[str, tuple[dict, str]] = {
    "APS10BM_2019.dat": ({}, "Mn"),  # MRCAT: energy, io, it, iref
    "APS13ID_2008.dat": ({}, "Zn"),  # EPICS scan, ';' comments
    "APS20BM_2001.dat": ({}, "Fe"),  # LabVIEW, 'Mono Energy *' column
    "SSRL1_2006.dat": ({}, "Ag"),  # a clock column before the energy
    "fe_athena.prj": ({}, "Fe"),  # three groups
    # Columns named $(Detector1) ...: which is I0 and which It is the user's choice.
    "CLSHXMA.dat": ({"i0": "detector1", "it": "detector2"}, "As"),
    # I0/I1 of the first hutch show no edge: the sample's mu is the file's mu_ref.
    "ESRF_BM08_LISA_2021.dat": ({"mode": "mu", "mu_column": "mu_ref"}, "Ge"),
    # The header names 18 columns for 13; the counters sit in columns 3 and 4.
    # Its 'i2' is no reference foil: no calibration.
    "MoFoil.dat": ({"i0": "e_hdh_kev", "it": "i0", "calibrate": False}, "Mo"),
    # A dilute trilayer: the edge is in the fluorescence channels.
    "NSLS_XDAC_2011.dat": ({"fluorescence": ["ifch*"]}, "Fe"),
    # Mono angle in column 1 (d-spacing in the header); the counters are unnamed.
    "PF9A_2022.dat": ({"i0": "col4", "fluorescence": ["col5"]}, "Fe"),
}
#: file -> (options, what the refusal says: parts separated by '|')
REFUSED: dict[str, tuple[dict, str]] = {
    "APS12BM_2019.dat": ({}, "not finite"),  # It is zero above the edge: too thick
    # ... and says which columns there are to choose from (its reference foil's mu_ref).
    "ESRF_BM08_LISA_2021.dat": ({}, "falls across the edge|; its columns: ebraggenergy, "),
    "CLSHXMA.dat": ({}, "cannot make mu(E)"),
    "PF9A_2022.dat": ({}, "cannot make mu(E)"),
    # Its header's names land one column off: 'fluo' on the point counter, which
    # 'auto' must not take for a fluorescence channel (it rises with every point).
    "MoFoil.dat": ({}, "falls across the edge|column names are shifted against its values"),
}
NO_OPTION = [name for name, (options, _) in READABLE.items() if not options]


def larch_pre_edge(energy: np.ndarray, mu: np.ndarray) -> tuple[float, float]:
    group = larch.Group(energy=np.asarray(energy, float), mu=np.asarray(mu, float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        larch_xafs.pre_edge(group)
    return float(group.e0), float(group.edge_step)


def assert_agrees_with_larch(where: str, normalization: xas.Normalization, larch_e0, larch_step):
    """Within 0.5 eV and 1% of Larch, or flagged as too noisy to decide."""
    e0, step = float(normalization.e0[0]), float(normalization.edge_step[0])
    unsure = (
        normalization.edge_noise[0] < xas.MIN_EDGE_NOISE_RATIO
        or normalization.e0_spread[0] > xas.MAX_E0_SPREAD
    )
    if unsure:
        return
    assert abs(e0 - larch_e0) <= 0.5, (where, e0, larch_e0)
    assert abs(step / larch_step - 1) <= 0.01, (where, step, larch_step)


@pytest.fixture(scope="module")
def beamlines(test_data) -> Path:
    return test_data / "xas" / "beamlines"


@pytest.mark.parametrize("name", list(READABLE))
def test_beamline_files_reduce_and_agree_with_larch(name, beamlines, tmp_path):
    options, element = READABLE[name]
    parameters = xas.SpectroscopyParameters(**options)
    plan = make_spectroscopy_plan(str(beamlines / name), parameters, output_dir=str(tmp_path))
    tabulated = xas.tabulated_edge(element, "K")
    reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
    for source in plan.sources:
        data = absorption(read_source(source), parameters)
        reduction = xas.reduce_spectra(
            data.energy,
            data.mu,
            mu_reference=data.mu_reference,
            reference_e0=reference_e0,
            **normalization_keywords(parameters),
            exafs=False,
            where=source.describe(),
        )
        # The energy column, its unit and the angle conversion: the edge is the element's
        # (within chemical shifts and an uncalibrated monochromator).
        e0 = float(reduction.normalization.e0[0])
        assert abs(e0 - tabulated) < 50, (source.describe(), e0, tabulated)
        # E0 and the step against Larch on the measured energies: Larch's E0 is a measured
        # point, so a calibration shift moves it by up to a point more than it moves ours.
        norm = xas.normalize(data.energy, data.mu, where=source.describe())
        assert_agrees_with_larch(source.describe(), norm, *larch_pre_edge(data.energy, data.mu[0]))
    if name.endswith(".prj"):
        assert [s.group for s in plan.sources] == ["fe2o3_rt1_xmu", "fe3c_rt_xdi", "feo_rt1_xmu"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_files_that_cannot_be_reduced_say_why(name, beamlines, tmp_path):
    options, message = REFUSED[name]
    path = beamlines / name
    with pytest.raises(CalypsoError) as refusal:
        make_spectroscopy_plan(
            str(path), xas.SpectroscopyParameters(**options), output_dir=str(tmp_path)
        )
    text = str(refusal.value)
    assert str(path) in text and "\n" not in text, text
    assert all(part in text for part in message.split("|")), text


def real_spectra(test_data: Path) -> list[Path]:
    return sorted((test_data / "xas").glob("*.xdi")) + sorted(
        (test_data / "xas" / "fexafs").glob("*")
    )


def test_every_real_spectrum_agrees_with_larch(test_data, tmp_path):
    paths = real_spectra(test_data)
    assert len(paths) >= 15
    for path in paths:
        # The Fe XANES repeats are a dilute sample: the edge is in the Fe Kα fluorescence.
        dilute = path.parent.name == "fexafs"
        parameters = xas.SpectroscopyParameters(fluorescence=["Sum_Fe_Ka"] if dilute else [])
        plan = make_spectroscopy_plan(str(path), parameters, output_dir=str(tmp_path))
        data = absorption(read_source(plan.sources[0]), parameters)
        norm = xas.normalize(data.energy, data.mu, where=str(path))
        assert_agrees_with_larch(str(path), norm, *larch_pre_edge(data.energy, data.mu[0]))
        assert norm.edge_noise[0] > xas.MIN_EDGE_NOISE_RATIO, path  # none of them is unsure
        assert norm.e0_spread[0] < xas.MAX_E0_SPREAD, path


def test_noise_that_decides_e0_is_flagged_not_guessed(test_data, tmp_path):
    """Fe metal's derivative has two peaks 9 eV apart: noise picks one, for Larch as for
    Calypso. Where the two disagree, the E0 spread (even vs odd points) says so."""
    path = test_data / "xas" / "fe_metal_rt.xdi"
    parameters = xas.SpectroscopyParameters()
    plan = make_spectroscopy_plan(str(path), parameters, output_dir=str(tmp_path))
    data = absorption(read_source(plan.sources[0]), parameters)
    energy, mu = np.asarray(data.energy), data.mu[0]
    step = larch_pre_edge(energy, mu)[1]
    disagreements = 0
    for seed in range(6):
        noisy = mu + np.random.default_rng(seed).normal(0, step / 100, mu.size)
        norm = xas.normalize(energy, noisy)
        larch_e0 = larch_pre_edge(energy, noisy)[0]
        if abs(float(norm.e0[0]) - larch_e0) > 0.5:
            disagreements += 1
            assert norm.e0_spread[0] > xas.MAX_E0_SPREAD, (seed, norm.e0, larch_e0)
    assert disagreements >= 2  # the case is a real one


def test_cli_reads_a_folder_of_beamline_files(
    beamlines, tmp_path, capsys, catalogue, on_shared_cluster
):
    """One CLI run over files of five families that need no option (merge and calibration off:
    they are different samples and edges)."""
    folder = tmp_path / "beamlines"
    folder.mkdir()
    for name in NO_OPTION:
        shutil.copy(beamlines / name, folder / name)
    out = tmp_path / "out"
    code = main(
        [
            "run", "spectroscopy", str(folder), "--output", str(out), "--json",
            "--set", "merge=false", "--set", "calibrate=false",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    figures = summary["key_figures"]
    parameters = xas.SpectroscopyParameters()
    plan = make_spectroscopy_plan(str(folder), parameters, output_dir=str(tmp_path / "check"))
    assert summary["count"] == len(plan.sources) == len(NO_OPTION) + 2  # the project: 3 groups
    for source in plan.sources:
        data = absorption(read_source(source), parameters)
        larch_e0, larch_step = larch_pre_edge(data.energy, data.mu[0])
        found = figures[source.label]
        assert abs(found["e0_eV"] - larch_e0) <= 0.5, (source.label, found, larch_e0)
        assert abs(found["edge_step"] / larch_step - 1) <= 0.01, (source.label, found)
        assert found["edge_noise"] > xas.MIN_EDGE_NOISE_RATIO and "warning" not in found
    assert summary["warnings"] == []


def test_a_spectrum_too_noisy_to_decide_e0_says_so_in_the_summary(
    test_data, tmp_path, capsys, on_shared_cluster
):
    """The doubt reaches the run's summary (the CLI's warnings, the UI's table), not only
    the log: a noisy copy of Fe metal whose E0 moves between the even and odd points."""
    table = np.loadtxt(test_data / "xas" / "fe_metal_rt.xdi", usecols=(0, 1))
    energy, mu = table[:, 0], table[:, 1]
    step = larch_pre_edge(energy, mu)[1]
    for seed in range(20):
        noisy = mu + np.random.default_rng(seed).normal(0, step / 100, mu.size)
        if xas.normalize(energy, noisy).e0_spread[0] > xas.MAX_E0_SPREAD:
            break
    else:
        pytest.fail("no noisy copy found")
    path = tmp_path / "noisy_fe.dat"
    np.savetxt(path, np.column_stack([energy, noisy]), header="energy mutrans")
    code = main(["run", "spectroscopy", str(path), "--output", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [warning] = json.loads(captured.out)["warnings"]
    assert "do not decide E0: it moves up to" in warning and "e0_spread" in warning


def test_a_spec_file_of_several_scans_is_one_spectrum_a_scan(test_data, tmp_path):
    """SPEC files hold scan after scan (#S); each is a spectrum (and repeats merge)."""
    parameters = xas.SpectroscopyParameters()
    plan = make_spectroscopy_plan(
        str(test_data / "xas" / "fe_metal_rt.xdi"), parameters, output_dir=str(tmp_path)
    )
    data = absorption(read_source(plan.sources[0]), parameters)
    energy, mu = np.asarray(data.energy), data.mu[0]
    i0 = np.full(energy.size, 1e5)
    lines = ["#F fe.spec", "#E 1700000000", ""]
    for number, keV in ((3, False), (4, True)):  # SPEC writers give keV too
        lines += [f"#S {number} xafs_scan", "#N 3", "#L Energy  I0  I1"]
        lines += [
            f"{e / 1000 if keV else e:.6f} {a:.1f} {a * np.exp(-m):.4f}"
            for e, a, m in zip(energy, i0, mu, strict=True)
        ]
        lines.append("")
    path = tmp_path / "fe.spec"
    path.write_text("\n".join(lines))
    plan = make_spectroscopy_plan(str(path), parameters, output_dir=str(tmp_path / "out"))
    assert [s.group for s in plan.sources] == ["3", "4"] and plan.merges
    larch_e0, larch_step = larch_pre_edge(energy, mu)
    for source in plan.sources:
        scan = absorption(read_source(source), parameters)
        norm = xas.normalize(scan.energy, scan.mu, where=source.describe())
        assert_agrees_with_larch(source.describe(), norm, larch_e0, larch_step)


def test_the_energy_counter_tells_a_maps_layout(tmp_path):
    """2D counters hold a spectrum a row, or an energy point a row (a map scanned an energy
    at a time): told by the dimension as long as the energy axis; a square map is a
    spectrum a row; a scan with counters of both layouts is refused, naming them."""
    import h5py

    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample
    from calypso.tasks.raw.spectra import energy_point_rows

    assert energy_point_rows(415, 600, 415) is False and energy_point_rows(415, 415, 600)
    assert energy_point_rows(415, 415, 415) is False  # square: a spectrum a row
    assert energy_point_rows(300, 300, 300, final=False) is None  # told by the next point
    assert energy_point_rows(16, 415, 600) is None  # an MCA's channels: not spectra

    dataset = write_spectroscopy_map_sample(tmp_path / "visitor", 70, seed=1, energy_rows=True)
    plan = make_spectroscopy_plan(str(dataset.raw_dataset_dir), xas.SpectroscopyParameters())
    assert [(s.n_spectra, s.n_points, s.energy_rows) for s in plan.sources] == [(70, 415, True)]
    with h5py.File(dataset.raw_file, "a") as h5:  # one counter a spectrum a row
        iref = h5["1.1/instrument/iref/data"]
        rows = iref[()].T
        del h5["1.1/instrument/iref/data"]
        h5["1.1/instrument/iref/data"] = rows
    with pytest.raises(CalypsoError, match=r"counters iref hold a spectrum of 415 .* i0, it"):
        make_spectroscopy_plan(str(dataset.raw_dataset_dir), xas.SpectroscopyParameters())


def _fe_foil(test_data: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The Fe foil's energies, mu(E) and E0, read from its XDI file."""
    parameters = xas.SpectroscopyParameters()
    path = test_data / "xas" / "fe_metal_rt.xdi"
    plan = make_spectroscopy_plan(str(path), parameters, output_dir=str(tmp_path / "xdi"))
    data = absorption(read_source(plan.sources[0]), parameters)
    energy, mu = np.asarray(data.energy), data.mu[0]
    return energy, mu, float(xas.normalize(energy, mu).e0[0])


def test_a_file_of_two_unnamed_columns_is_its_energy_and_mu(test_data, tmp_path):
    """No header, two columns (ESRF ID24's Cu foil: the energy in keV, mu(E)): read as a
    user reads it, and said so; it was refused for want of an It column."""
    energy, mu, e0 = _fe_foil(test_data, tmp_path)
    path = tmp_path / "foil.txt"
    np.savetxt(path, np.column_stack([energy / 1000.0, mu]), fmt="%.7f")
    plan = make_spectroscopy_plan(str(path), xas.SpectroscopyParameters(), output_dir=str(tmp_path))
    assert any("two columns, 'col1' the energy: mu(E) is 'col2'" in n for n in plan.notes)
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert float(xas.normalize(data.energy, data.mu).e0[0]) == pytest.approx(e0, abs=0.01)


def test_a_normalised_export_whose_first_point_is_out_of_order(test_data, tmp_path):
    """'#eV Norm' (an exported normalised XANES) whose first point comes before the scan
    turned round (the monochromator before it settled): the energy column is 'eV', mu(E)
    the 'Norm' column, the first point put in order, and said so. Refused before: no
    energy column."""
    energy, mu, e0 = _fe_foil(test_data, tmp_path)
    first = int(np.searchsorted(energy, energy[0] + 30.0))  # inside the scan's range
    order = [first, *(i for i in range(energy.size) if i != first)]
    path = tmp_path / "exported.dat"
    np.savetxt(path, np.column_stack([energy[order], mu[order]]), header="eV\tNorm")
    plan = make_spectroscopy_plan(str(path), xas.SpectroscopyParameters(), output_dir=str(tmp_path))
    assert any("steps back at 1 point(s)" in note for note in plan.notes), plan.notes
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert np.array_equal(data.energy.reshape(-1), energy)
    assert float(xas.normalize(data.energy, data.mu).e0[0]) == e0


def test_a_calibrated_spectrum_says_how_far_its_energies_moved(
    beamlines, tmp_path, capsys, on_shared_cluster
):
    """SSRL's Ag K scan of 2006 has a reference foil 9 eV off its tabulated edge: the
    summary's key figures say by how much the energies moved (only fit/energy_shift did)."""
    path = beamlines / "SSRL1_2006.dat"
    code = main(["run", "spectroscopy", str(path), "--output", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [found] = json.loads(captured.out)["key_figures"].values()
    parameters = xas.SpectroscopyParameters()
    plan = make_spectroscopy_plan(str(path), parameters, output_dir=str(tmp_path / "check"))
    data = absorption(read_source(plan.sources[0]), parameters)
    measured = larch_pre_edge(data.energy, data.mu[0])[0]  # on the energies as measured
    assert -10.0 < found["energy_shift_eV"] < -8.0, found
    assert found["e0_eV"] - found["energy_shift_eV"] == pytest.approx(measured, abs=0.5)


def test_two_columns_one_a_counter_by_name_are_no_spectrum(test_data, tmp_path):
    """SESAME's mono scan of I0 alone (energy, I0): refused, not reduced as mu(E)."""
    energy, mu, _ = _fe_foil(test_data, tmp_path)
    path = tmp_path / "flux.dat"
    np.savetxt(path, np.column_stack([energy, np.exp(-mu)]), header="energy I0")
    with pytest.raises(CalypsoError, match="cannot make mu"):
        make_spectroscopy_plan(str(path), xas.SpectroscopyParameters(), output_dir=str(tmp_path))


def test_an_angle_by_name_is_not_the_energy_and_zap_scans_name_theirs(test_data, tmp_path):
    """ESRF SNBL's zap scans: TwoTheta (9.9-10.3 deg) before ZapEnergy (keV). TwoTheta
    passed for keV (no d-spacing to make it an angle) and the spectrum came out 860 eV
    low, without a word; ZapEnergy is the energy, by its name."""
    energy, mu, e0 = _fe_foil(test_data, tmp_path)
    i0 = np.full(energy.size, 1e5)
    columns = [np.linspace(9.9, 10.3, energy.size), energy / 1000.0, i0, i0 * np.exp(-mu)]
    for name in ("ZapEnergy", "Mono_kev_readback"):  # by its name; found by its values
        path = tmp_path / f"{name}.dat"
        np.savetxt(path, np.column_stack(columns), header=f"TwoTheta {name} i0 it")
        plan = make_spectroscopy_plan(
            str(path), xas.SpectroscopyParameters(), output_dir=str(tmp_path)
        )
        data = absorption(read_source(plan.sources[0]), plan.parameters)
        assert float(xas.normalize(data.energy, data.mu).e0[0]) == pytest.approx(e0, abs=0.01)


def test_a_mu_column_named_for_its_formula(test_data, tmp_path):
    """SSRL's 'log(i0/it)' (Larch: log_i0_it) is mu(E) in transmission."""
    energy, mu, e0 = _fe_foil(test_data, tmp_path)
    path = tmp_path / "ssrl.dat"
    np.savetxt(path, np.column_stack([energy, mu]), header="energy log(i0/it)")
    plan = make_spectroscopy_plan(str(path), xas.SpectroscopyParameters(), output_dir=str(tmp_path))
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert float(xas.normalize(data.energy, data.mu).e0[0]) == pytest.approx(e0, abs=0.01)
