"""MX spot finding and per-scan indicators on arrays with known answers."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from calypso.techniques import mx


def background_with_spots(
    spots: list[tuple[float, float, float]], shape=(256, 256), level=10.0, seed=0
) -> np.ndarray:
    """Poisson background plus Gaussian spots (x, y, total counts), sigma 0.9 px."""
    rows, columns = np.indices(shape)
    expected = np.full(shape, level)
    for x, y, total in spots:
        profile = np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / (2 * 0.9**2))
        expected += total * profile / profile.sum()
    return np.random.default_rng(seed).poisson(expected).astype(np.int32)


def find(image: np.ndarray, valid: np.ndarray | None = None) -> mx.Spots:
    valid = np.ones(image.shape, bool) if valid is None else valid
    return mx.find_spots(image, valid)


def test_pure_poisson_background_gives_no_spots():
    for level in (0.5, 3.0, 50.0):
        image = np.random.default_rng(1).poisson(level, (512, 512))
        assert len(find(image)) == 0, level


def test_spots_are_found_where_they_are():
    rng = np.random.default_rng(2)
    truth = [(x, y, 300.0) for x, y in rng.uniform(10, 246, (40, 2))]
    truth = [t for i, t in enumerate(truth) if all(math.dist(t[:2], u[:2]) > 6 for u in truth[:i])]
    spots = find(background_with_spots(truth))
    assert len(spots) == len(truth)
    errors = [np.min(np.hypot(spots.x - x, spots.y - y)) for x, y, _ in truth]
    # 300 counts over 5-6 strong pixels on a background of 10: Poisson noise and
    # the pixel grid leave a few tenths of a pixel at worst.
    assert max(errors) < 0.5 and np.median(errors) < 0.2


def test_centroid_and_intensity():
    spots = find(background_with_spots([(100.3, 60.7, 2000.0)], level=5.0))
    assert len(spots) == 1
    assert spots.x[0] == pytest.approx(100.3, abs=0.1)
    assert spots.y[0] == pytest.approx(60.7, abs=0.1)
    assert 0.7 * 2000 < spots.intensity[0] < 1.05 * 2000  # the core above the background


def test_hot_pixels_are_not_spots_and_masks_hide_clusters():
    image = background_with_spots([], level=5.0)
    image[50, 50] = 10_000  # one hot pixel: smaller than min_spot_size
    image[100:102, 100:102] = 10_000  # a hot cluster: a spot, unless masked
    assert len(find(image)) == 1
    valid = np.ones(image.shape, bool)
    valid[100:102, 100:102] = False
    assert len(find(image, valid)) == 0


def test_resolution_of_a_pixel():
    geometry = mx.DetectorGeometry(
        beam_x_px=100, beam_y_px=200, distance_m=0.2, wavelength_a=1.0, pixel_size_um=100
    )
    # 2theta = atan(0.02 m / 0.2 m) at 200 px from the beam
    d = geometry.d_spacing(np.array([300.0]), np.array([200.0]))[0]
    assert d == pytest.approx(1.0 / (2 * math.sin(math.atan(0.1) / 2)), rel=1e-9)
    assert np.isinf(geometry.d_spacing(np.array([100.0]), np.array([200.0]))[0])


def test_resolution_estimate_is_the_best_five_percent():
    d = np.linspace(2.0, 20.0, 100)
    assert mx.resolution_estimate(d) == pytest.approx(np.percentile(d, 5))
    assert math.isnan(mx.resolution_estimate(d[:9]))


def test_ice_rings_are_told_from_bragg_spots():
    rng = np.random.default_rng(3)
    # Bragg spots uniform in 1/d^2 between 1.8 and 20 Å, denser at low resolution.
    s = np.concatenate([rng.uniform(1 / 20**2, 1 / 1.8**2, 600), rng.uniform(0.01, 0.1, 300)])
    bragg = 1 / np.sqrt(s)
    assert not mx.has_ice_rings(bragg, 1.8, 20, 4.0)
    ring = rng.normal(3.669, 0.005, 40)
    assert mx.has_ice_rings(np.concatenate([bragg, ring]), 1.8, 20, 4.0)


def test_hit_rate():
    assert mx.hit_rate(np.array([0, 5, 20, 300]), 20) == 0.5
    assert mx.hit_rate(np.array([]), 20) == 0


def test_grid_map_follows_a_snake():
    values = np.arange(6)
    np.testing.assert_array_equal(mx.grid_map(values, (2, 3)), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(mx.grid_map(values, (2, 3), snake=True), [[0, 1, 2], [5, 4, 3]])
    with pytest.raises(ValueError, match="holds 8 images, not 6"):
        mx.grid_map(values, (2, 4))


def test_centring_is_the_crystal_not_one_noisy_cell():
    rows, columns = np.indices((5, 7))
    heat = 800 * np.exp(-((rows - 1.6) ** 2 + (columns - 4.3) ** 2) / (2 * 1.3**2))
    heat[4, 0] = 900  # one cell lit by a salt crystal or an ice chunk
    assert mx.centring_position(heat) == (2, 4)
    with pytest.raises(ValueError, match="no spots"):
        mx.centring_position(np.zeros((3, 3)))


def test_keyword_defaults_are_the_parameter_defaults():
    fields = mx.MXScience.model_fields
    for function, count in ((mx.find_spots, 8), (mx.summarize_image, 1)):
        keywords = inspect.signature(function).parameters
        shared = [name for name in keywords if name in fields]
        assert len(shared) == count, function
        for name in shared:
            assert keywords[name].default == fields[name].default, (function, name)


def test_parameters_are_grouped_and_paths_are_marked():
    assert mx.MXParameters.path_fields() == ["mask"]
    assert mx.MXParameters.glob_fields() == ["images"]
    groups = [mx.MXSource, mx.MXScience, mx.MXExecution]
    assert [n for g in groups for n in g.model_fields] == list(mx.MXParameters.model_fields)
