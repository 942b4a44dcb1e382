"""The tomography steps on arrays: each against an exact answer from the analytic phantom."""

from __future__ import annotations

import inspect
import math
import os

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from calypso.flows.samples.tomography import PhantomGeometry, phantom_volume, project_phantom
from calypso.tasks.plans.tomography import read_margin
from calypso.techniques import tomography as tomo

GEOMETRY = PhantomGeometry(rows=6, columns=160, center_of_rotation=79.5 + 6.6, radius=66.0)
ANGLES = np.radians(np.arange(300) * 0.6)


@pytest.fixture(scope="module")
def line_integrals() -> np.ndarray:
    return project_phantom(GEOMETRY, ANGLES).astype(np.float32)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return phantom_volume(GEOMETRY)


def object_ssim(truth: np.ndarray, image: np.ndarray) -> float:
    """SSIM over the disc that holds the object (the field outside it is empty in both)."""
    n = truth.shape[-1]
    y, x = np.mgrid[:n, :n]
    disc = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2) <= GEOMETRY.radius + 3
    _, similarity = structural_similarity(
        truth, image, data_range=float(truth.max() - truth.min()), full=True
    )
    return float(similarity[disc].mean())


def test_flats_are_interpolated_between_before_and_after():
    rng = np.random.default_rng(0)
    dark = rng.uniform(90, 110, (4, 5)).astype(np.float32)
    beam = rng.uniform(1e4, 2e4, (4, 5))
    transmission = rng.uniform(0.2, 0.9, (7, 4, 5))
    positions = np.arange(10, 17)  # projections between flats at 4.5 and 21.5
    decay = 1 - 0.01 * np.arange(30)  # the beam falls by 1% a frame
    flats = np.stack([beam * decay[round(p)] + dark for p in (4.5, 21.5)]) + 0
    flats[0] = beam * (1 - 0.01 * 4.5) + dark
    flats[1] = beam * (1 - 0.01 * 21.5) + dark
    projections = transmission * beam * (1 - 0.01 * positions)[:, None, None] + dark
    corrected = tomo.flat_field_correction(projections, dark, flats, positions, [4.5, 21.5])
    np.testing.assert_allclose(corrected, transmission, rtol=1e-5)
    # Averaging the two series instead leaves a trend of several percent.
    averaged = tomo.flat_field_correction(projections, dark, flats)
    assert np.abs(averaged / transmission - 1).max() > 0.03


def test_flat_weights_clamp_outside_the_series():
    below, above, weight = tomo.flat_weights(np.array([0, 5, 10, 20]), np.array([5.0, 15.0]))
    assert below.tolist() == [0, 0, 0, 0] and above.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(weight, [0, 0, 0.5, 1])


def test_dead_flat_pixels_do_not_divide_by_zero():
    flats = np.full((1, 2, 2), 100.0)
    flats[0, 0, 0] = 5.0  # not above the dark
    corrected = tomo.flat_field_correction(np.full((1, 2, 2), 60.0), np.full((2, 2), 10.0), flats)
    assert np.isfinite(corrected).all() and corrected[0, 0, 0] == 1


def test_minus_log_floors_the_transmission():
    values = tomo.minus_log(np.array([1.0, math.exp(-2), 0.0, -3.0], dtype=np.float32), 1e-3)
    np.testing.assert_allclose(values, [0, 2, -math.log(1e-3), -math.log(1e-3)], rtol=1e-6)


def test_ring_removal_removes_the_ring_of_a_drifted_pixel(line_integrals):
    sinograms = line_integrals[:, 2:4].copy()
    sinograms[:, :, 70] += 0.05  # a pixel whose gain drifted: a stripe, a ring
    cleaned = tomo.remove_rings(sinograms, size=3)
    center = GEOMETRY.center_of_rotation

    reference = tomo.reconstruct(line_integrals[:, 2:4], ANGLES, center)
    n = GEOMETRY.columns
    y, x = np.mgrid[:n, :n]
    radius = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2)
    ring = np.abs(radius - abs(70 - center)) < 1.5  # where the stripe's ring lands

    def ring_error(data: np.ndarray) -> float:
        return float(np.abs(tomo.reconstruct(data, ANGLES, center) - reference)[:, ring].mean())

    assert ring_error(cleaned) < ring_error(sinograms) / 2
    # Away from the stripe the sinogram barely changes.
    elsewhere = np.abs(cleaned - line_integrals[:, 2:4])[:, :, :60].mean()
    assert elsewhere < 0.02 * line_integrals[:, 2:4, :60].mean()


def test_ring_filter_scales_with_the_detector():
    parameters = tomo.TomographyParameters()
    assert parameters.ring_filter_size(192) == 3
    assert parameters.ring_filter_size(2048) == 21
    assert tomo.TomographyParameters(ring_size=8).ring_filter_size(2048) == 9
    assert tomo.ring_filter_size(2048) == 21 and tomo.ring_filter_size(2048, size=8) == 9


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_center_of_rotation_within_a_tenth_of_a_pixel(line_integrals, noise):
    rng = np.random.default_rng(3)
    sinogram = line_integrals[:, 3] + noise * rng.standard_normal(line_integrals[:, 3].shape)
    found = tomo.find_center_of_rotation(sinogram, ANGLES)
    assert found.value == pytest.approx(GEOMETRY.center_of_rotation, abs=0.1)
    assert found.confidence > 0.5


def test_center_of_rotation_confidence_is_low_without_structure():
    rng = np.random.default_rng(4)
    noise = rng.normal(1.0, 0.01, (300, 160)).astype(np.float32)
    assert tomo.find_center_of_rotation(noise, ANGLES).confidence < 0.3


def test_less_than_half_a_turn_is_refused(line_integrals):
    with pytest.raises(ValueError, match="180"):
        tomo.find_center_of_rotation(line_integrals[:200, 3], ANGLES[:200])


def test_fbp_matches_the_phantom(line_integrals, truth):
    volume = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation)
    assert volume.shape == (6, 160, 160) and volume.dtype == np.float32
    for row in range(6):
        assert object_ssim(truth[row], volume[row]) > 0.92
    # Quantitative: the mean attenuation inside the object within 2%.
    inside = truth != 0
    assert volume[inside].mean() == pytest.approx(truth[inside].mean(), rel=0.02)


def test_fbp_is_deterministic(line_integrals):
    """algotom's parallel kernel is not (a race between threads): ours runs it serially."""
    first = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation)
    second = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation)
    np.testing.assert_array_equal(first, second)


def test_a_wrong_center_blurs_the_slice(line_integrals, truth):
    good = tomo.reconstruct(line_integrals[:, 2:3], ANGLES, GEOMETRY.center_of_rotation)
    bad = tomo.reconstruct(line_integrals[:, 2:3], ANGLES, GEOMETRY.center_of_rotation + 3)
    assert object_ssim(truth[2], bad[0]) < object_ssim(truth[2], good[0]) - 0.1


def test_fbp_is_algotoms_fbp_on_one_thread(line_integrals, tmp_path):
    """Same values as algotom's own FBP run on one numba thread (in a fresh process, so
    this process's numba threading state is left alone)."""
    import subprocess
    import sys

    np.save(tmp_path / "sinograms.npy", line_integrals)
    script = (
        "import numpy as np; from algotom.rec.reconstruction import fbp_reconstruction; "
        f"s = np.load({str(tmp_path / 'sinograms.npy')!r}); "
        f"a = np.radians(np.arange(300) * 0.6); "
        f"r = fbp_reconstruction(s, {GEOMETRY.center_of_rotation}, angles=a, apply_log=False, "
        "gpu=False, ncore=1); "
        f"np.save({str(tmp_path / 'reference.npy')!r}, r)"
    )
    environment = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment)
    reference = np.load(tmp_path / "reference.npy")
    n = len(ANGLES)
    ours = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation)
    np.testing.assert_allclose(
        ours, np.moveaxis(reference, 1, 0) * (n - 1) / n, rtol=1e-5, atol=1e-7
    )


def test_dfi_matches_the_phantom(line_integrals, truth):
    volume = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation, algorithm="dfi")
    assert object_ssim(truth[3], volume[3]) > 0.9


@pytest.mark.skipif(not tomo.tomopy_available(), reason="tomopy is not installed (not on PyPI)")
def test_gridrec_matches_the_phantom(line_integrals, truth):
    volume = tomo.reconstruct(
        line_integrals, ANGLES, GEOMETRY.center_of_rotation, algorithm="gridrec"
    )
    assert object_ssim(truth[3], volume[3]) > 0.9


@pytest.mark.skipif(not tomo.gpu_available(), reason="no CUDA GPU on this machine")
def test_gpu_fbp_matches_the_cpu(line_integrals):
    cpu = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation)
    gpu = tomo.reconstruct(line_integrals, ANGLES, GEOMETRY.center_of_rotation, gpu=True)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3 * np.abs(cpu).max())


def test_paganin_keeps_the_mean_and_smooths():
    rng = np.random.default_rng(5)
    transmission = (0.6 + 0.05 * rng.standard_normal((2, 64, 64))).astype(np.float32)
    filtered = tomo.paganin_filter(
        transmission, energy_kev=20, distance_m=0.5, pixel_size_um=1.0, delta_beta=200
    )
    assert filtered.mean() == pytest.approx(transmission.mean(), rel=5e-3)
    assert filtered.std() < transmission.std() / 3
    uniform = np.full((1, 32, 40), 0.7, dtype=np.float32)
    np.testing.assert_allclose(tomo.paganin_filter(uniform, 20, 0.5, 1.0, 200), uniform, rtol=1e-5)


def test_paganin_margin_follows_the_kernel_width():
    physics = {"energy_kev": 20, "distance_m": 0.5, "pixel_size_um": 1.0, "delta_beta": 200}
    length = tomo.paganin_length_px(20, 0.5, 1.0, 200)
    assert tomo.paganin_margin(**physics) == math.ceil(8 * length)
    # The tasks read the margin only when Paganin is on.
    assert read_margin(tomo.TomographyParameters(paganin=True, **physics)) == math.ceil(8 * length)
    assert read_margin(tomo.TomographyParameters(**physics)) == 0


def test_paganin_needs_its_physics():
    with pytest.raises(ValueError, match="energy_kev"):
        tomo.TomographyParameters(paganin=True)


def test_rescale_maps_the_range_onto_integers():
    values = np.array([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32)
    assert tomo.rescale(values, (0.0, 1.0), "uint8").tolist() == [0, 0, 128, 255, 255]
    assert tomo.rescale(values, (0.0, 1.0), "float32").tolist() == [0, 0, 0.5, 1, 1]
    assert tomo.rescale(values, None, "float32") is values
    with pytest.raises(ValueError, match="range"):
        tomo.rescale(values, None, "uint16")


def test_parameters_reject_inconsistent_values():
    with pytest.raises(ValueError, match="rows"):
        tomo.TomographyParameters(rows=(10, 5))
    with pytest.raises(ValueError, match="output_range"):
        tomo.TomographyParameters(output_range=(1.0, 0.0))


def test_binned_reconstruction_keeps_values_per_detector_pixel(line_integrals, truth):
    binned, angles, center = tomo.bin_sinograms(
        line_integrals[:, 2:3], ANGLES, GEOMETRY.center_of_rotation, 2
    )
    assert binned.shape == (150, 1, 80) and center == pytest.approx(
        (GEOMETRY.center_of_rotation - 0.5) / 2
    )
    image = tomo.reconstruct(binned, angles, center)[0] / 2
    inside = truth[2] != 0
    small = truth[2].reshape(80, 2, 80, 2).mean(axis=(1, 3))
    assert image[small > 0.5 * truth[2][inside].mean()].mean() == pytest.approx(
        truth[2][inside].mean(), rel=0.05
    )


def test_prepared_sinograms_are_minus_log_of_the_transmission():
    rng = np.random.default_rng(6)
    transmission = rng.uniform(0.2, 0.9, (5, 3, 32))
    dark = np.full((3, 32), 100.0)
    flats = np.full((1, 3, 32), 10_100.0)
    sinograms = tomo.prepare_sinograms(
        transmission * 10_000 + dark, dark, flats, ring_removal=False
    )
    assert sinograms.dtype == np.float32
    np.testing.assert_allclose(sinograms, -np.log(transmission), rtol=1e-5)
    with pytest.raises(ValueError, match="energy_kev"):
        tomo.prepare_sinograms(transmission, None, flats, paganin=True)


def test_keyword_defaults_are_the_parameter_defaults():
    fields = tomo.TomographyScience.model_fields
    for function, count in ((tomo.prepare_sinograms, 10), (tomo.paganin_margin, 4)):
        keywords = inspect.signature(function).parameters
        shared = [name for name in keywords if name in fields]
        assert len(shared) == count, function
        for name in shared:
            default = keywords[name].default
            if default is not inspect.Parameter.empty:  # paganin_margin's are required
                assert default == fields[name].default, (function, name)


def test_parameters_are_grouped_and_paths_are_marked():
    groups = [tomo.TomographySource, tomo.TomographyScience, tomo.TomographyExecution]
    fields = [name for group in groups for name in group.model_fields]
    assert fields == list(tomo.TomographyParameters.model_fields)
    assert tomo.TomographyParameters.path_fields() == []
    assert tomo.TomographyParameters.glob_fields() == ["projections", "darks", "flats"]
