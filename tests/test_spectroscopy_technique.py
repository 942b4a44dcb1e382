"""XAS technique functions against xraylarch and xraydb, on the real spectra of the shared data."""

from __future__ import annotations

import inspect
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.spectra import read_text_spectrum
from calypso.techniques import spectroscopy as xas

larch_xafs = pytest.importorskip("larch.xafs", reason="xraylarch is the reference (test extra)")
larch = pytest.importorskip("larch")
xraydb = pytest.importorskip("xraydb")

XDI_FILES = [
    "co_metal_rt.xdi",
    "cu_metal_10K.xdi",
    "cu_metal_rt.xdi",
    "fe2o3_rt.xdi",
    "fe3c_rt.xdi",
    "fe_metal_rt.xdi",
    "fen_rt.xdi",
    "feo_rt1.xdi",
    "se_na2so4_rt.xdi",
    "zn_znse_rt.xdi",
]


def load(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    table = read_text_spectrum(path)
    data = absorption(table, xas.SpectroscopyParameters())
    return np.asarray(data.energy), data.mu[0], table.metadata


@pytest.fixture(params=XDI_FILES)
def spectrum(request, test_data):
    path = test_data / "xas" / request.param
    return (request.param, *load(path))


def larch_group(energy, mu, **pre_edge):
    group = larch.Group(energy=energy, mu=mu)
    larch_xafs.pre_edge(group, **pre_edge)
    return group


def test_e0_matches_larch_and_the_tabulated_edge(spectrum):
    name, energy, mu, metadata = spectrum
    e0 = float(xas.find_e0(energy, mu)[0])
    reference = larch_group(energy, mu)
    assert abs(e0 - reference.e0) <= 0.5, (name, e0, reference.e0)
    # A sanity check of the energy scale: compounds sit up to ~15 eV above the
    # tabulated (metal) edge, the chemical shift; metal foils within 3 eV (below).
    tabulated = xraydb.xray_edge(metadata["Element.symbol"], metadata["Element.edge"]).energy
    assert -3.0 <= e0 - tabulated <= 15.0, (name, e0, tabulated)


def test_metal_foils_are_within_3_ev_of_the_table(test_data):
    for name in ("co_metal_rt.xdi", "cu_metal_rt.xdi", "cu_metal_10K.xdi", "fe_metal_rt.xdi"):
        energy, mu, metadata = load(test_data / "xas" / name)
        tabulated = xraydb.xray_edge(metadata["Element.symbol"], metadata["Element.edge"]).energy
        assert abs(xas.find_e0(energy, mu)[0] - tabulated) <= 3.0, name


def test_default_edge_step_is_within_3_percent_of_larch_defaults(spectrum):
    name, energy, mu, _ = spectrum
    ours = xas.normalize(energy, mu)
    reference = larch_group(energy, mu)
    assert ours.edge_step[0] == pytest.approx(reference.edge_step, rel=0.03), name


def test_same_parameters_give_larchs_normalisation_and_chi(spectrum):
    name, energy, mu, _ = spectrum
    defaults = larch_group(energy, mu)
    details = defaults.pre_edge_details
    same = {
        "e0": float(defaults.e0),
        "pre1": details.pre1,
        "pre2": details.pre2,
        "norm1": details.norm1,
        "norm2": details.norm2,
        "nnorm": int(details.nnorm),
    }
    ours = xas.normalize(energy, mu, **same)
    reference = larch_group(energy, mu, **same)
    assert ours.edge_step[0] == pytest.approx(reference.edge_step, rel=0.01), name
    rms = np.sqrt(np.mean((ours.norm[0] - reference.norm) ** 2))
    assert rms <= 0.01, (name, rms)

    larch_xafs.autobk(reference, rbkg=1.0, kweight=1)
    exafs = xas.autobk(energy, mu, ours, rbkg=1.0, bkg_kweight=1.0)
    window = (exafs.k >= 2) & (exafs.k <= 12)
    k = exafs.k[window]
    theirs = np.interp(k, reference.k, reference.chi)
    correlation = np.corrcoef(exafs.chi[0][window] * k**2, theirs * k**2)[0, 1]
    assert correlation >= 0.98, (name, correlation)


def test_batches_give_the_same_result_as_single_spectra(test_data):
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    rng = np.random.default_rng(3)
    batch = mu * rng.uniform(0.5, 2.0, (6, 1)) + rng.normal(0, 1e-3, (6, mu.size))
    together = xas.reduce_spectra(energy, batch)
    for row in range(batch.shape[0]):
        alone = xas.reduce_spectra(energy, batch[row])
        assert alone.normalization.e0[0] == pytest.approx(together.normalization.e0[row])
        # Fit ranges follow the batch median E0, so they move by a fraction of an eV.
        np.testing.assert_allclose(
            alone.normalization.norm[0], together.normalization.norm[row], atol=1e-3
        )
        n = min(alone.exafs.k.size, together.exafs.k.size)
        np.testing.assert_allclose(
            alone.exafs.chi[0][:n], together.exafs.chi[row][:n], atol=0.02 * np.abs(batch).max()
        )


def test_a_batchs_fourier_transform_holds_little_more_than_its_results(test_data):
    """chi(R) is transformed a block of rows at a time: the zero-padded transform of a
    whole batch held ~50 kB a spectrum at once for the few hundred R points kept (autobk's
    peak was ~6x its results, 130 MB for 2,500 spectra). The numbers are the whole
    batch's transform, bit for bit."""
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    rng = np.random.default_rng(5)
    batch = mu * rng.uniform(0.5, 2.0, (2000, 1)) + rng.normal(0, 1e-3, (2000, mu.size))
    normalization = xas.normalize(energy, batch)
    tracemalloc.start()
    try:
        exafs = xas.autobk(energy, batch, normalization)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    results = exafs.chi.nbytes + exafs.background.nbytes + exafs.chir_magnitude.nbytes
    assert peak < 4 * results, (peak / 1e6, results / 1e6)

    weighted = exafs.chi * (exafs.k**2 * xas.ft_window(exafs.k, 2.0, exafs.kmax, 1.0, "hanning"))
    whole = xas.KSTEP / np.sqrt(np.pi) * np.fft.rfft(weighted, n=xas.NFFT, axis=-1)
    assert np.array_equal(np.abs(whole[:, : exafs.r.size]), exafs.chir_magnitude)


def a_map_batch(test_data, n: int, off_sample: slice | None = None):
    """``n`` spectra of the Fe foil as a map's batch: each scaled, noisy and measured with its
    own monochromator offset (calibrated on the foil itself); ``off_sample`` rows are noise."""
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    rng = np.random.default_rng(7)
    energies = energy + rng.normal(0, 0.3, (n, 1))
    batch = mu * rng.uniform(0.5, 2.0, (n, 1)) + rng.normal(0, 1e-3, (n, mu.size))
    if off_sample is not None:
        batch[off_sample] = rng.normal(1.0, 0.01, batch[off_sample].shape)
    foil = float(xas.find_e0(energy, mu)[0])
    return energies, batch, {"mu_reference": np.broadcast_to(mu, batch.shape), "reference_e0": foil}


@pytest.mark.parametrize("rows", [7, 512])
def test_a_batch_reduced_a_block_at_a_time_gives_the_whole_batchs_numbers(test_data, rows):
    """Blocks of spectra, the batch's shared grids and fit decided first: bit for bit the
    batch reduced at once, spectra left out included (one run of them longer than a block)."""
    energies, batch, calibration = a_map_batch(test_data, 1500, off_sample=slice(600, 1200))
    batch[3] = np.random.default_rng(8).normal(1.0, 0.01, batch.shape[1])
    whole = xas.reduce_spectra(energies, batch, **calibration, skip_unusable=True)
    assert whole.skipped[600:1200].all() and whole.skipped[3] and not whole.skipped.all()
    blocks = xas.BatchReduction(energies, batch, **calibration, skip_unusable=True)
    normalized = list(blocks.normalized(rows))
    exafs = list(blocks.exafs(rows))
    assert [r.start for r, _ in normalized] == list(range(0, 1500, rows))

    def joined(parts, name):
        return np.concatenate([getattr(part, name) for _, part in parts])

    norms = [(r, part.normalization) for r, part in normalized]
    for name in ("energy", "mu", "shift", "skipped"):
        assert np.array_equal(joined(normalized, name), getattr(whole, name), equal_nan=True)
    for name in ("e0", "edge_step", "norm", "flat", "pre_edge", "post_edge", "e0_spread"):
        expected = getattr(whole.normalization, name)
        assert np.array_equal(joined(norms, name), expected, equal_nan=True), name
    for name in ("chi", "background", "chir_magnitude"):
        assert np.array_equal(joined(exafs, name), getattr(whole.exafs, name), equal_nan=True)
    assert all(part.normalization.ranges == whole.normalization.ranges for _, part in normalized)


def test_a_batch_reduced_a_block_at_a_time_holds_little_more_than_its_inputs(test_data):
    """Beyond its inputs, what a batch's reduction holds grows by ~6 kB a spectrum (its mu(k),
    pre-edge lines and background fit) when reduced a block at a time, against ~40 kB at
    once: a map's workers need little more memory for larger batches (docs/performance.md)."""

    def peak(n: int, rows: int | None) -> int:
        energies, batch, calibration = a_map_batch(test_data, n)
        tracemalloc.start()
        try:
            blocks = xas.BatchReduction(energies, batch, **calibration)
            for _ in blocks.normalized(rows or n):
                pass
            for _ in blocks.exafs(rows or n):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    per_spectrum = (peak(3000, xas.BLOCK_ROWS) - peak(1000, xas.BLOCK_ROWS)) / 2000
    at_once = (peak(3000, None) - peak(1000, None)) / 2000
    assert per_spectrum < 20e3 < at_once, (per_spectrum, at_once)


def test_calibration_recovers_a_known_monochromator_offset(test_data):
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    measured = energy + 2.5  # a monochromator reading 2.5 eV high
    foil_e0 = float(xas.find_e0(energy, mu)[0])
    reduction = xas.reduce_spectra(measured, mu, mu_reference=mu[None, :], reference_e0=foil_e0)
    assert reduction.shift[0] == pytest.approx(-2.5, abs=0.1)
    assert reduction.normalization.e0[0] == pytest.approx(foil_e0, abs=0.1)


def test_merging_five_repeats_lowers_the_noise(test_data):
    """The five Fe XANES repeats (fluorescence): the merge is less noisy than every repeat."""
    parameters = xas.SpectroscopyParameters(
        mode="fluorescence", fluorescence=["Sum_Fe_Ka"], i0="I0", exafs=False
    )
    energies, spectra, noise = [], [], []
    for path in sorted((test_data / "xas" / "fexafs").iterdir()):
        data = absorption(read_text_spectrum(path), parameters)
        reduced = xas.reduce_spectra(data.energy, data.mu, exafs=False, where=str(path))
        e0 = float(reduced.normalization.e0[0])
        energies.append(reduced.energy[0])
        spectra.append(reduced.normalization.norm[0])
        noise.append(xas.spectrum_noise(reduced.energy[0], spectra[-1], e0))
    assert len(spectra) == 5
    merged = xas.merge_spectra(energies, spectra, np.array(noise))
    e0 = float(xas.find_e0(merged.energy, merged.values)[0])
    merged_noise = xas.spectrum_noise(merged.energy, merged.values, e0)
    assert merged_noise < min(noise), (merged_noise, noise)
    # and an equal-weight merge of the same spectra is noisier than the weighted one
    plain = xas.merge_spectra(energies, spectra)
    assert merged_noise < xas.spectrum_noise(plain.energy, plain.values, e0)


def test_where_the_slope_lattice_falls_does_not_decide_the_edge(test_data):
    """An Fe foil (strong EXAFS, the hard case): its edge contrast, the first point moved so
    the slopes' lattice starts elsewhere. On a lattice of 2.5 eV secants it went from 2.4
    to 3.1, refused at 8% of the starts; secants every third of that keep it at 3.0-3.1."""
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    e0 = xas.find_e0(energy, mu)
    contrasts = []
    for shift in np.arange(0.0, 2.5, 0.25):  # eV; the first point is 10 eV from the next
        moved = energy.copy()
        moved[0] += shift
        contrasts.append(float(xas.edge_contrast(moved, mu, e0)[0]))
    assert min(contrasts) > 2.9 and max(contrasts) - min(contrasts) < 0.2, contrasts


def test_a_glitch_far_from_the_edge_does_not_refuse_the_spectrum(test_data):
    """One point 20% of the edge step off, 150 eV above an Fe foil's edge (a monochromator
    glitch): its edge contrast fell to 1.0 and the spectrum was refused as having no edge."""
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    clean = xas.reduce_spectra(energy, mu)
    e0 = clean.normalization.e0
    glitched = mu.copy()
    glitched[np.searchsorted(energy, e0[0] + 150.0)] += 0.2 * clean.normalization.edge_step[0]
    contrast = xas.edge_contrast(energy, mu, e0)[0]
    assert xas.edge_contrast(energy, glitched, e0)[0] == pytest.approx(contrast, rel=0.01)
    reduced = xas.reduce_spectra(energy, glitched)
    assert reduced.normalization.e0[0] == e0[0]


def test_pure_noise_does_not_pass_for_an_edge(test_data):
    """20,000 spectra of white noise on an Fe foil's energies (a map's pixels in air):
    none passes the edge test. Taking glitches out with a median of three everywhere let
    8 through (it smoothed the noise); only points far beyond the noise are taken out."""
    energy, _, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    noise = np.random.default_rng(0).normal(1.0, 0.01, (20_000, energy.size))
    from calypso.techniques.spectroscopy.reduction import NO_EDGE

    masks = xas.unusable_spectra(energy, noise, exafs=False)
    assert masks[NO_EDGE].all()


def test_a_glitch_steeper_than_the_edge_is_not_taken_for_it(test_data):
    """One point one to three edge steps off, 40 or 150 eV above an Fe foil's edge, or 30
    eV below it, is steeper than the edge. E0 used to land on it, and the spectrum was
    refused as having no edge (a U L3 scan with one such point in It, APS 10-ID). The
    first guess of E0 is now taken with glitches out: E0 and the edge step are the clean
    spectrum's. (Off-sample noise does not pass for an edge the more for it: the block
    test above and :func:`test_pure_noise_does_not_pass_for_an_edge`.)"""
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    clean = xas.reduce_spectra(energy, mu).normalization
    for above, steps in ((40.0, 1.0), (40.0, 3.0), (150.0, 1.0), (-30.0, 3.0)):
        glitched = mu.copy()
        glitched[np.searchsorted(energy, clean.e0[0] + above)] += steps * clean.edge_step[0]
        found = xas.reduce_spectra(energy, glitched, where="scan 7").normalization
        assert found.e0[0] == clean.e0[0], (above, steps)
        assert found.edge_step[0] == pytest.approx(clean.edge_step[0], rel=0.07), (above, steps)


def test_bad_spectra_are_refused_with_the_reason(test_data):
    energy, mu, _ = load(test_data / "xas" / "fe_metal_rt.xdi")
    backwards = energy.copy()
    backwards[100], backwards[101] = backwards[101], backwards[100]
    with pytest.raises(RawDataError, match="not strictly increasing"):
        xas.reduce_spectra(backwards, mu, where="scan 7")
    above = energy > 7260  # 150 eV above the edge (closer, see the test above and edge_contrast)
    with pytest.raises(RawDataError, match="does not cover the edge|too close to the edge"):
        xas.reduce_spectra(energy[above], mu[above], where="scan 7")
    broken = mu.copy()
    broken[10] = np.nan
    with pytest.raises(RawDataError, match="scan 7: mu.*not finite"):
        xas.reduce_spectra(energy, broken, where="scan 7")


def test_keyword_defaults_are_the_parameter_defaults():
    fields = xas.SpectroscopyScience.model_fields
    functions = {xas.edge_ranges: 5, xas.normalize: 8, xas.autobk: 14, xas.reduce_spectra: 24}
    for function, count in functions.items():
        keywords = inspect.signature(function).parameters
        shared = [n for n, p in keywords.items() if n in fields and p.kind is p.KEYWORD_ONLY]
        assert len(shared) == count, function
        for name in shared:
            assert keywords[name].default == fields[name].default, (function, name)


def test_parameters_are_grouped_and_name_no_files():
    groups = [xas.SpectroscopySource, xas.SpectroscopyScience, xas.SpectroscopyExecution]
    fields = [name for group in groups for name in group.model_fields]
    assert fields == list(xas.SpectroscopyParameters.model_fields)
    assert xas.SpectroscopyParameters.path_fields() == []
    assert xas.SpectroscopyParameters.glob_fields() == []
