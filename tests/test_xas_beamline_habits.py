"""Habits of other beamlines' files, each met in a real file from a beamline the shared
data does not cover (Larch's examples: NSLS-II BMM and ISS, APS 9-BM and 13-ID, SSRL),
and rebuilt here from the shared real spectra.

- BMM's XDI header gives the d-spacing with its unit (``Mono.d_spacing: 3.1356369 Å``).
- APS 9-BM names its counters with their scaler channel (``I0-32``, ``It-32``, ``Iref-32``),
  and leaves the reference chamber without a foil.
- BMM measures fluorescence on a mesh no beam crosses: It reads zero or negative, and the
  file's own ``xmu`` column is the fluorescence; SSRL and 9-BM leave I1 at zero.
- ISS puts another element's foil (Au L3, 11919 eV) behind an As sample (11867 eV).
- 13-ID's file of a scan stopped at the edge (it ends 0.4 eV above E0).
- 13-ID-E's XANES of a dilute sample: no edge in transmission (I1), its fluorescence in
  the sums of a 7-element detector's regions (``Sum_Fe_Ka``, ``Fe_Ka_mca1`` ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calypso.errors import CalypsoError
from calypso.flows.cli import main
from calypso.tasks.plans.spectroscopy import make_spectroscopy_plan
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.spectra import read_source, read_text_spectrum
from calypso.techniques import spectroscopy as xas


@pytest.fixture(scope="module")
def foil(test_data) -> tuple[np.ndarray, np.ndarray]:
    """Energy (eV) and mu(E) of the Fe foil (APS 13-BM-D): sample and reference foil."""
    table = read_text_spectrum(test_data / "xas" / "fe_metal_rt.xdi")
    return table.columns["energy"], table.columns["mutrans"]


def write_columns(path: Path, names: str, columns: list[np.ndarray]) -> Path:
    np.savetxt(path, np.column_stack(columns), header=names, fmt="%.8g")
    return path


def plan_of(path: Path, tmp_path: Path, **options):
    return make_spectroscopy_plan(
        str(path), xas.SpectroscopyParameters(**options), output_dir=str(tmp_path / "out")
    )


def test_a_d_spacing_given_with_its_unit_is_read(test_data, tmp_path):
    original = test_data / "xas" / "cu_metal_rt.xdi"
    text = original.read_text()
    assert "# Mono.d_spacing: 3.13553\n" in text
    with_unit = tmp_path / "cu_bmm_header.xdi"
    with_unit.write_text(
        text.replace("# Mono.d_spacing: 3.13553\n", "# Mono.d_spacing: 3.13553 Å\n")
    )
    plan = plan_of(with_unit, tmp_path)
    table = read_source(plan.sources[0])
    assert table.metadata["Mono.d_spacing"] == "3.13553 Å"
    data, reference = (
        absorption(read_source(p.sources[0]), p.parameters)
        for p in (plan, plan_of(original, tmp_path))
    )
    assert np.array_equal(data.mu, reference.mu)


def test_counters_named_with_their_scaler_channel_are_found(foil, tmp_path):
    energy, mu = foil
    i0 = np.full(energy.size, 5.7e6)
    path = write_columns(
        tmp_path / "aps9bm.dat", "Mono_Energy I0-32 It-32", [energy, i0, i0 * np.exp(-mu)]
    )
    plan = plan_of(path, tmp_path)
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert data.mode == "transmission"
    assert np.allclose(data.mu[0], mu, atol=1e-6)


def test_counters_named_with_their_amplifier_are_found(foil, tmp_path):
    """SLS PHOENIX: 'I0_KEITHLEY1_c4', 'I1_KEITHLEY2_c6', beside the amplifiers' gains."""
    energy, mu = foil
    i0, gain = np.full(energy.size, 0.14), np.full(energy.size, 7.0)
    path = write_columns(
        tmp_path / "phoenix.dat", "Energy_c1 I0_KEITHLEY1_c4 KEITHLEY1_GAIN_c5 I1_KEITHLEY2_c6",
        [energy, i0, gain, i0 * np.exp(-mu)],
    )  # fmt: skip
    plan = plan_of(path, tmp_path)
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert data.mode == "transmission" and np.allclose(data.mu[0], mu, atol=1e-6)
    twice = write_columns(
        tmp_path / "twice.dat", "energy I0_V I0_cts I1_cts",
        [energy, i0, i0, i0 * np.exp(-mu)],
    )  # fmt: skip
    with pytest.raises(CalypsoError, match="no i0 column"):
        plan_of(twice, tmp_path)


def test_two_counters_of_one_name_are_not_guessed_between(foil, tmp_path):
    energy, mu = foil
    i0 = np.full(energy.size, 1e6)
    path = write_columns(
        tmp_path / "two.dat", "energy i0 it_1 it_2", [energy, i0, i0 * np.exp(-mu), i0 / 2]
    )
    with pytest.raises(CalypsoError, match="no It column"):
        plan_of(path, tmp_path)


def test_it_at_zero_is_named_not_taken_for_a_lost_beam(foil, tmp_path):
    energy, mu = foil
    i0 = np.full(energy.size, 1e6)
    lytle = 2e3 * (1 - np.exp(-mu))
    path = write_columns(tmp_path / "ssrl.dat", "energy i0 i1 lytle", [energy, i0, 0 * i0, lytle])
    with pytest.raises(CalypsoError) as refusal:
        plan_of(path, tmp_path, mode="transmission")
    message = str(refusal.value)
    assert str(path) in message and "It (i1) is zero everywhere" in message
    assert "--set fluorescence=" in message and "lytle" in message
    plan = plan_of(path, tmp_path, fluorescence=["lytle"])  # as the message says
    assert absorption(read_source(plan.sources[0]), plan.parameters).mode == "fluorescence"
    # With no option, the Lytle chamber (a fluorescence chamber's usual name) is taken.
    chosen = plan_of(path, tmp_path)
    assert chosen.parameters.fluorescence == ["lytle"]
    assert "It (i1) is zero everywhere" in chosen.notes[0], chosen.notes


def test_fluorescence_through_a_mesh_takes_the_files_own_mu(foil, tmp_path, capsys, catalogue):
    """It reads zero or negative at 8% of the points (BMM, a slurry on a mesh): transmission
    cannot be made, and the file's ``xmu`` (its fluorescence) is the spectrum, saying so."""
    energy, mu = foil
    rng = np.random.default_rng(0)
    i0 = np.full(energy.size, 26.0)
    it = np.abs(rng.normal(5e-4, 3e-4, energy.size))
    it[::12] = -1e-4
    xmu = 800 * (1 - np.exp(-mu)) / 0.9
    path = write_columns(tmp_path / "bmm.dat", "energy xmu I0 It", [energy, xmu, i0, it])
    plan = plan_of(path, tmp_path)
    assert plan.parameters.mode == "mu" and plan.parameters.mu_column == "xmu"
    assert "file's own 'xmu' column" in plan.notes[0], plan.notes
    # A user who asks for transmission gets what was asked, and its refusal.
    with pytest.raises(CalypsoError, match="not finite"):
        plan_of(path, tmp_path, mode="transmission")
    out = tmp_path / "run"
    code = main(["run", "spectroscopy", str(path), "--output", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert any("file's own 'xmu' column" in w for w in summary["warnings"]), summary
    larch_like = xas.normalize(energy, xmu[None, :])
    assert summary["key_figures"]["bmm"]["e0_eV"] == pytest.approx(larch_like.e0[0], abs=0.01)


def reference_run(foil, tmp_path: Path, mu_reference: np.ndarray, name: str):
    energy, mu = foil
    i0 = np.full(energy.size, 1e6)
    it = i0 * np.exp(-mu)
    path = write_columns(
        tmp_path / f"{name}.dat",
        "energy i0 it iref",
        [energy, i0, it, it * np.exp(-mu_reference)],
    )
    return path, plan_of(path, tmp_path)


def test_a_reference_chamber_without_a_foil_leaves_the_energy_uncalibrated(foil, tmp_path):
    """APS 9-BM: Iref read through air, no foil: its log ratio to It falls smoothly, with no
    edge. Its steepest point is no foil's edge: no calibration, and the run says so."""
    energy, _ = foil
    air = 0.3 * (7000.0 / energy) ** 3
    _, plan = reference_run(foil, tmp_path, air, "no_foil")
    assert plan.calibration is None
    assert "reference channel shows no absorption edge" in plan.notes[0], plan.notes
    # The same file with the Fe foil in it (the mono 2 eV off) is calibrated, as before.
    _, calibrated = reference_run(foil, tmp_path, np.interp(energy + 2.0, *foil), "fe_foil")
    assert calibrated.calibration is not None and calibrated.calibration.element == "Fe"
    assert calibrated.notes == []


def test_a_foil_of_another_element_is_not_taken_for_the_samples(foil, tmp_path):
    """ISS: an Au foil (L3, 11919 eV) behind an As sample (K, 11867 eV). Taken for an As foil,
    it would shift the energy by 40 eV; the edges 40 eV apart say it is another element's."""
    energy, _ = foil
    other = np.interp(energy - 40.0, *foil)  # the foil's edge 40 eV above the sample's
    _, plan = reference_run(foil, tmp_path, other, "other_foil")
    assert plan.calibration is None
    assert "a foil of another element" in plan.notes[0], plan.notes
    # Told the foil's tabulated edge, the run calibrates against it.
    edge = xas.tabulated_edge("Fe", "K") + 40.0
    told = make_spectroscopy_plan(
        str(tmp_path / "other_foil.dat"),
        xas.SpectroscopyParameters(reference_e0=edge),
        output_dir=str(tmp_path / "told"),
    )
    assert told.calibration is not None and told.calibration.reference_e0 == edge


def test_a_scan_stopped_on_the_edge_is_refused(foil, tmp_path):
    """13-ID: the file of a scan stopped 0.4 eV above E0. Its 'post-edge' would be the edge's
    own rise: refused, for a XANES reduction as for EXAFS."""
    energy, mu = foil
    e0 = float(xas.normalize(energy, mu[None, :]).e0[0])
    cut = energy <= e0 + 0.4
    i0 = np.full(energy.size, 1e6)
    path = write_columns(
        tmp_path / "stopped.dat", "energy i0 it", [energy[cut], i0[cut], (i0 * np.exp(-mu))[cut]]
    )
    for options in ({}, {"exafs": False}):
        with pytest.raises(CalypsoError) as refusal:
            plan_of(path, tmp_path, **options)
        assert str(path) in str(refusal.value) and "stops on the edge" in str(refusal.value)
    # 30 eV further, a XANES scan, is reduced.
    longer = energy <= e0 + 30.0
    path = write_columns(
        tmp_path / "xanes.dat",
        "energy i0 it",
        [energy[longer], i0[longer], (i0 * np.exp(-mu))[longer]],
    )
    assert plan_of(path, tmp_path, exafs=False).sources


def test_an_energy_read_back_with_jitter_is_put_in_order_as_larch_does(foil, tmp_path):
    """SLS PHOENIX: the energy read back steps back 0.02 eV at one point (steps of 0.2 eV).
    Each point keeps the mu(E) measured at its energy; Larch's pre_edge sorts them, and so
    does the run, saying so. Two points swapped (a whole step back) are still refused."""
    energy, mu = foil
    i0 = np.full(energy.size, 1e6)
    it = i0 * np.exp(-mu)
    jittered = energy.copy()
    point = int(np.searchsorted(energy, 7150.0))
    jittered[point] = energy[point - 1] - 0.1 * (energy[point] - energy[point - 1])
    path = write_columns(tmp_path / "sls.dat", "Energy_c1 i0 it", [jittered, i0, it])
    plan = plan_of(path, tmp_path)
    assert "steps back at 1 point" in plan.notes[0], plan.notes
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    order = np.argsort(jittered)
    assert np.array_equal(data.energy, jittered[order])
    assert np.allclose(data.mu[0], mu[order], atol=1e-6)
    swapped = energy.copy()
    swapped[[point, point + 1]] = swapped[[point + 1, point]]
    path = write_columns(tmp_path / "swapped.dat", "energy i0 it", [swapped, i0, it])
    with pytest.raises(CalypsoError, match="not strictly increasing"):
        plan_of(path, tmp_path)


def test_a_xanes_scan_is_reduced_without_exafs_saying_so(foil, tmp_path):
    """APS 9-BM's S K-edge scan ends 28 eV above E0 (k = 2.9 1/Å): a XANES scan. The run
    reduces it without EXAFS, and says so, whether EXAFS was asked for or not (a served
    run's parameters come through JSON, every field set: the data decides)."""
    energy, mu = foil
    e0 = float(xas.normalize(energy, mu[None, :]).e0[0])
    keep = energy <= e0 + 28.0
    i0 = np.full(keep.sum(), 1e6)
    path = write_columns(
        tmp_path / "xanes.dat", "energy i0 it", [energy[keep], i0, i0 * np.exp(-mu[keep])]
    )
    for options in ({}, {"exafs": True}):
        plan = plan_of(path, tmp_path, **options)
        assert plan.parameters.exafs is False
        notes = plan.notes
        assert any(f"{path}: the scan reaches only k = 2." in note for note in notes), notes
    served = xas.SpectroscopyParameters.model_validate_json(
        xas.SpectroscopyParameters().model_dump_json()
    )
    plan = make_spectroscopy_plan(str(path), served, output_dir=str(tmp_path / "served"))
    assert plan.parameters.exafs is False


def test_an_aps_labview_files_column_list_names_every_column(foil, tmp_path):
    """APS 20-ID 2022: the LabVIEW file's readable list of column headings has a name with a
    parenthesis in it ("Mono Energy (alt) *"). Larch splits that list at every ')': it
    loses a name and gives each later column the name of the one after it. The run names
    the columns from the list, so a channel asked for by name is that channel's counts."""
    energy, mu = foil
    n = energy.size
    i0 = np.full(n, 6.4e4)
    channels = {  # number: (name in the list, values)
        1: ("Mono Energy (alt) *", energy),
        2: ("Scaler preset time *", np.full(n, 0.5)),
        3: ("ID Gap *", 13 + energy / 1e4),
        4: ("Timer", np.zeros(n)),
        5: ("Preslit", np.full(n, 2e5)),
        6: ("Pre_KB", np.full(n, 4.7e4)),
        7: ("I0", i0),
        8: ("It", np.full(n, 27.0)),
        9: ("Iref", np.full(n, 2.5e3)),
        10: ("XSP3:DT Corr I0", np.zeros(n)),
        11: ("XSP3:FeKa_Sum", 3e5 * (1 - np.exp(-mu))),
        12: ("EigerROI1", np.full(n, 2e3)),
        13: ("XSP3:Total_Sum", np.full(n, 1e6)),
    }
    half = (len(channels) + 1) // 2
    legend = [
        "#  "
        + "".join(
            f"{k:>2}) {channels[k][0]:<21}" for k in (row, row + half) if k in channels
        ).rstrip()
        for row in range(1, half + 1)
    ]
    header = [
        "# 1-D Scan File created by LabVIEW Control Panel  7/9/2022  1:00:29 PM",
        "# Beamline 20-ID",
        "# Here is a readable list of column headings:",
        *legend,
        "#",
        "# Column Headings:",
        "#" + "".join(f"{name:<21}" for name, _ in channels.values()),
    ]
    rows = np.column_stack([values for _, values in channels.values()])
    path = tmp_path / "aps20id.dat"
    path.write_text(
        "\n".join(header) + "\n" + "\n".join(" ".join(f"{v:.8g}" for v in r) for r in rows) + "\n"
    )
    plan = plan_of(path, tmp_path, fluorescence=["xsp3_feka_sum"], i0="i0")
    table = read_source(plan.sources[0])
    assert list(table.columns)[10:13] == ["xsp3_feka_sum", "eigerroi1", "xsp3_total_sum"]
    data = absorption(table, plan.parameters)
    assert np.allclose(data.mu[0], channels[11][1] / i0)


def test_a_broad_edge_beside_a_sharp_peak_is_found(foil, tmp_path):
    """APS 20-ID 2022: a Pb L3 edge 10 eV wide, and a diffraction peak 50 eV above it that
    rises as steeply over 2.5 eV: the slopes alone refused it ("no absorption edge"). Its
    rise across E0, over 15 eV on each side, is what no narrow peak has."""
    energy, mu = foil
    normalization = xas.normalize(energy, mu[None, :])
    e0, step = float(normalization.e0[0]), float(normalization.edge_step[0])
    peak = 0.3 * step * np.exp(-0.5 * ((energy - e0 - 60.0) / 1.0) ** 2)
    with_peak = mu + peak
    assert xas.edge_contrast(energy, with_peak[None, :], [e0])[0] < xas.MIN_EDGE_CONTRAST
    assert xas.rise_contrast(energy, with_peak[None, :], [e0])[0] >= xas.MIN_RISE_CONTRAST
    i0 = np.full(energy.size, 1e6)
    path = write_columns(
        tmp_path / "peak.dat", "energy i0 it", [energy, i0, i0 * np.exp(-with_peak)]
    )
    plan = plan_of(path, tmp_path)
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert xas.normalize(data.energy, data.mu).e0[0] == pytest.approx(e0, abs=0.5)


def test_an_e0_given_is_not_checked_by_the_edge_test(foil, tmp_path):
    """The refusal "no absorption edge" says to give E0: given, it is the user's word."""
    energy, mu = foil
    e0 = float(xas.normalize(energy, mu[None, :]).e0[0])
    cut = energy > e0 + 150.0  # EXAFS only: no edge in the scan
    i0 = np.full(cut.sum(), 1e6)
    path = write_columns(
        tmp_path / "cut.dat", "energy i0 it", [energy[cut], i0, i0 * np.exp(-mu[cut])]
    )
    with pytest.raises(CalypsoError, match="no absorption edge.*give e0"):
        plan_of(path, tmp_path)
    assert plan_of(path, tmp_path, e0=float(energy[cut][20]), exafs=False).sources


def test_noise_on_a_short_xanes_scan_is_not_an_edge(foil, tmp_path):
    """APS 9-BM 2006: a 40 eV S K-edge scan whose 'lytle' channel is noise. The edge test
    compares the edge's slope with slopes 30 eV away, and such a scan has none: noise
    passed for an edge half the time, its 'edge step' up to 3.4 times mu(E)'s range. On
    the same 40 eV grid, the Fe foil's XANES is reduced and white noise never is."""
    energy, mu = foil
    e0 = float(xas.normalize(energy, mu[None, :]).e0[0])
    grid = energy[(energy >= e0 - 10.0) & (energy <= e0 + 30.0)]
    i0 = np.full(grid.size, 1e5)
    xanes = 90 * (1 - np.exp(-np.interp(grid, energy, mu)))
    path = write_columns(tmp_path / "xanes.dat", "energy i0 lytle", [grid, i0, xanes])
    assert plan_of(path, tmp_path, fluorescence=["lytle"]).sources
    for seed in range(20):
        noise = np.random.default_rng(seed).uniform(0, 90, grid.size)
        path = write_columns(tmp_path / f"noise{seed}.dat", "energy i0 lytle", [grid, i0, noise])
        with pytest.raises(CalypsoError) as refusal:
            plan_of(path, tmp_path, fluorescence=["lytle"])
        assert any(
            words in str(refusal.value) for words in ("no absorption edge", "stops on the edge")
        ), (seed, str(refusal.value))


def test_a_xanes_maps_pixels_of_noise_are_left_out(foil):
    """The same rule for a XANES map's pixels: on a 40 eV scan, pixels of white noise (off
    the sample) are left out as 'no absorption edge', the Fe foil's XANES is reduced."""
    from calypso.techniques.spectroscopy.reduction import NO_EDGE, unusable_spectra

    energy, mu = foil
    e0 = float(xas.normalize(energy, mu[None, :]).e0[0])
    grid = energy[(energy >= e0 - 10.0) & (energy <= e0 + 30.0)]
    xanes = np.interp(grid, energy, mu)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, (50, grid.size))
    scaled = xanes * rng.uniform(0.5, 2.0, (50, 1)) + rng.normal(0, 1e-3, (50, grid.size))
    masks = unusable_spectra(grid, np.vstack([scaled, noise]), exafs=False)
    assert not masks[NO_EDGE][:50].any()
    assert masks[NO_EDGE][50:].all()


def test_a_dilute_samples_edge_is_taken_from_its_fluorescence_channels(test_data, tmp_path):
    """13-ID-E's real Fe XANES (shared data): no edge in I1/I0. With no option the planner
    takes the Fe Kα sum (Fe's K edge is inside the scan; Ca Kα's is not), saying so; the
    spectrum is the one a user who names the channels gets. Where the file has no sum,
    the line's seven channels are summed; a user who asks for transmission gets its
    refusal."""
    scan = test_data / "xas" / "fexafs" / "fexanes_a.001"
    plan = plan_of(scan, tmp_path)
    assert plan.parameters.mode == "fluorescence"
    assert plan.parameters.fluorescence == ["Sum_Fe_Ka"]
    assert "mu(E) is the fluorescence of Sum_Fe_Ka over I0" in plan.notes[0], plan.notes
    named = plan_of(scan, tmp_path, mode="fluorescence", fluorescence=["Sum_Fe_Ka"])
    ours, theirs = (absorption(read_source(p.sources[0]), p.parameters) for p in (plan, named))
    assert np.array_equal(ours.mu, theirs.mu)
    with pytest.raises(CalypsoError, match="no absorption edge"):
        plan_of(scan, tmp_path, mode="transmission")

    table = read_text_spectrum(scan)
    names = [n for n in table.columns if n != "Sum_Fe_Ka"]
    without_sum = write_columns(
        tmp_path / "fexanes_channels.dat", " ".join(names), [table.columns[n] for n in names]
    )
    plan = plan_of(without_sum, tmp_path)
    channels = [f"Fe_Ka_mca{i}" for i in range(1, 8)]
    found = plan.parameters.fluorescence
    assert [c.lower() for c in found] == [c.lower() for c in channels], found
    summed = absorption(read_source(plan.sources[0]), plan.parameters)
    i0 = table.columns["I0"]
    expected = sum(table.columns[c] for c in channels) / i0
    assert np.allclose(summed.mu[0], expected[np.isfinite(expected)], rtol=1e-9)


def test_transmission_with_an_edge_is_kept_whatever_channels_the_file_has(foil, tmp_path):
    energy, mu = foil
    i0 = np.full(energy.size, 1e6)
    fe_ka = 3e3 * (1 - np.exp(-mu))  # a fluorescence sum beside a good transmission
    path = write_columns(
        tmp_path / "both.dat", "energy I0 It Sum_Fe_Ka", [energy, i0, i0 * np.exp(-mu), fe_ka]
    )
    plan = plan_of(path, tmp_path)
    assert plan.parameters.mode == "auto" and not plan.notes
    data = absorption(read_source(plan.sources[0]), plan.parameters)
    assert data.mode == "transmission"


def test_a_noisy_transmission_gives_way_to_a_clean_fluorescence_chamber(foil, tmp_path):
    """NSLS-II ISS: a dilute As sample whose transmission edge is a fraction of its noise
    (E0 undecided: its even and odd points put it 11.7 eV apart), and whose fluorescence
    chamber ``iff`` shows the edge clearly. 'auto' takes ``iff``, saying why; a clean
    transmission is kept (the test above)."""
    energy, mu = foil
    rng = np.random.default_rng(3)
    i0 = np.full(energy.size, 2e-5)
    step = (mu - mu.min()) / (mu.max() - mu.min())
    it = i0 * np.exp(-(1.0 + 0.05 * step + rng.normal(0, 0.002, energy.size)))
    iff = i0 * 0.05 * (0.1 + step)
    path = write_columns(tmp_path / "iss.dat", "energy i0 it iff", [energy, i0, it, iff])
    transmission = plan_of(path, tmp_path, mode="transmission")
    data = absorption(read_source(transmission.sources[0]), transmission.parameters)
    noisy = xas.normalize(data.energy, data.mu)
    assert xas.e0_undecided(noisy.edge_noise, noisy.e0_spread)[0]
    plan = plan_of(path, tmp_path)
    assert plan.parameters.mode == "fluorescence" and plan.parameters.fluorescence == ["iff"]
    assert "transmission's E0 is not decided by the data" in plan.notes[0], plan.notes
    clean = absorption(read_source(plan.sources[0]), plan.parameters)
    found = xas.normalize(clean.energy, clean.mu)
    assert not xas.e0_undecided(found.edge_noise, found.e0_spread)[0]
    assert found.e0[0] == pytest.approx(xas.normalize(energy, mu[None, :]).e0[0], abs=0.01)
    # A map's pixels are checked one at a time: a weak first pixel keeps transmission.
    from calypso.tasks.plans.spectroscopy import check_first_spectrum

    table = read_source(plan.sources[0])
    pixel = check_first_spectrum(table, "map", xas.SpectroscopyParameters(), single=False)
    assert not pixel.chosen and not pixel.e0_decided


@pytest.mark.parametrize(
    ("names", "scanned", "expected"),
    [
        # 13-ID-E: the sum of the line whose edge is scanned (Fe K at 7112 eV, not Ca K).
        ("energy I0 I1 Sum_Ca_Ka Sum_Fe_Ka Fe_Ka_mca1 Fe_Ka_mca2", (7032, 7356), [["Sum_Fe_Ka"]]),
        # No sum: each element's channel once, its dead-time corrected one (SLS PHOENIX).
        (
            "Energy_c1 MgKa_sum_cps_c2 D1_AlKa_corr_c13 D2_AlKa_corr_c15 D1_AlKa_c22 iff",
            (1480, 1840),
            [["D1_AlKa_corr_c13", "D2_AlKa_corr_c15"], ["iff"]],
        ),
        # APS 20-ID: the line within the name ('xsp3_pbla_sum'), L lines by the L3 edge.
        ("energy I0 It xsp3_pbla_sum xsp3_asKa_sum", (12935, 13135), [["xsp3_pbla_sum"]]),
        # Nothing named for fluorescence: nothing guessed.
        ("energy I0 It Iref time", (7000, 8000), []),
    ],
)
def test_fluorescence_channels_are_found_by_their_names(names, scanned, expected):
    from calypso.tasks.raw.fluorescence_channels import fluorescence_candidates
    from calypso.tasks.raw.spectra import ColumnTable

    table = ColumnTable("file", {name: np.zeros(3) for name in names.split()})
    assert fluorescence_candidates(table, np.array(scanned, dtype=float)) == expected


def test_numbered_fluorescence_channels_are_summed(test_data, tmp_path):
    """NSLS X23A2 (shared data): a 4-element Vortex's channels 'Ifch1' ... 'Ifch4', no
    edge in transmission. With no option they are summed, as with --set fluorescence=ifch*."""
    scan = test_data / "xas" / "beamlines" / "NSLS_XDAC_2011.dat"
    plan = plan_of(scan, tmp_path)
    assert [c.lower() for c in plan.parameters.fluorescence] == [f"ifch{i}" for i in range(1, 5)]
    named = plan_of(scan, tmp_path, fluorescence=["ifch*"])
    ours, theirs = (absorption(read_source(p.sources[0]), p.parameters) for p in (plan, named))
    assert np.array_equal(ours.mu, theirs.mu)
