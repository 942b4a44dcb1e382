"""Per-image quality indicators for macromolecular crystallography (MX).

Spot finding uses the **dispersion threshold** of DIALS (Parkhurst et al. 2016,
after Leslie's MOSFLM): in a square window around every pixel, the background
is Poisson-like when its variance/mean ratio (the index of dispersion) is
close to the detector gain; a pixel is *strong* when its window is over-
dispersed and the pixel itself stands several standard deviations above the
window's mean. It needs no prior knowledge of the background (ice, solvent,
air scatter) and is the spot finder most MX beamlines already trust through
DIALS and xia2, which is why it is used here rather than peakfinder8's
radial statistics (tuned for serial crystallography with a known background).
Strong pixels are grouped into 8-connected spots; spots smaller than
``min_spot_size`` pixels are noise and dropped.

Arrays follow pyFAI/fabio: ``image[row, column]``; a spot's position is its
intensity-weighted centroid (x = column, y = row) in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calypso.techniques.fields import TechniqueParameters
from calypso.techniques.masks import DEFAULT_MIN_UNMASKED_FRACTION

# Ice Ih powder rings, d-spacings in Å (the strongest ones, hexagonal ice).
ICE_RINGS_A = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.721)


class MXSource(TechniqueParameters):
    """Which images to read, which pixels to mask, and how the scan's grid was laid out."""

    model_config = ConfigDict(extra="forbid")

    detector: str | None = Field(
        None, description="Bliss: the 2D detector (default: the only one in the scans)"
    )
    images: str = Field(
        "*",
        description="folder input: glob of the image files to read (e.g. 'thau_*')",
        json_schema_extra={"path": "glob"},
    )
    mask: str | None = Field(
        None,
        description="mask image (non-zero = bad pixel): EDF, TIFF, .npy, FILE.h5::/path",
        json_schema_extra={"path": "file"},
    )
    min_unmasked_fraction: float = Field(
        DEFAULT_MIN_UNMASKED_FRACTION,
        ge=0,
        le=1,
        description="refuse a mask that leaves fewer of the detector's pixels than this "
        "fraction (0: any mask)",
    )
    grid: tuple[int, int] | None = Field(
        None,
        description="grid scan shape [rows, columns] (default: from the Bliss mesh title)",
    )
    snake: bool = Field(False, description="grid rows alternate direction (snake scan)")


class MXScience(TechniqueParameters):
    """Geometry overrides, spot finding (DIALS' dispersion threshold), hits and ice."""

    model_config = ConfigDict(extra="forbid")

    beam_x_px: float | None = Field(None, description="beam centre, column (px); overrides")
    beam_y_px: float | None = Field(None, description="beam centre, row (px); overrides")
    distance_m: float | None = Field(None, gt=0, description="sample-detector distance, m")
    wavelength_a: float | None = Field(None, gt=0, description="wavelength, Å")
    pixel_size_um: float | None = Field(None, gt=0, description="pixel size, µm")
    gain: float = Field(1.0, gt=0, description="detector gain (counts per photon)")
    kernel_size: int = Field(
        3, ge=1, description="half width of the local window (3: a 7x7 window, as DIALS)"
    )
    sigma_background: float = Field(
        6.0, gt=0, description="dispersion threshold: over-dispersion of the window, sigmas"
    )
    sigma_strong: float = Field(
        3.0, gt=0, description="dispersion threshold: pixel above the window mean, sigmas"
    )
    global_threshold: float = Field(0.0, ge=0, description="ignore pixels at or below, counts")
    min_local: int = Field(2, ge=2, description="valid pixels a window needs")
    min_spot_size: int = Field(3, ge=1, description="smallest spot kept, pixels")
    max_spot_size: int = Field(1000, ge=1, description="largest spot kept, pixels")
    d_max_a: float | None = Field(
        40.0, gt=0, description="ignore spots at lower resolution than this (beam stop), Å"
    )
    hit_min_spots: int = Field(
        20, ge=1, description="an image with at least this many spots is a hit"
    )
    ice_ring_ratio: float = Field(
        4.0,
        gt=1,
        description="ice flag: spots on ice-ring d-spacings this many times the uniform share",
    )

    @model_validator(mode="after")
    def _spot_sizes_in_order(self) -> MXScience:
        if self.min_spot_size > self.max_spot_size:
            raise ValueError(
                f"min_spot_size={self.min_spot_size} is above max_spot_size="
                f"{self.max_spot_size}: no spot could be kept"
            )
        return self


class MXExecution(TechniqueParameters):
    """How the work is cut into tasks, and whether an indexing program runs."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int | None = Field(None, ge=1, description="images per task (default: auto)")
    indexing: bool = Field(
        True,
        description="run xia2 (or DIALS) on the data when found on PATH; otherwise skipped "
        "and said in the report",
    )


# pydantic orders the fields from the last base to the first: source, science, execution.
class MXParameters(MXExecution, MXScience, MXSource):
    """Spot finding, hit and centring parameters (DIALS names where DIALS has one)."""

    model_config = ConfigDict(extra="forbid")


class DetectorGeometry(BaseModel):
    """Flat detector perpendicular to the beam (the stills and centring case).

    Only a physical geometry is accepted: a wavelength, distance or pixel size that is
    zero, negative or not finite gives resolutions of the wrong sign or none (a negative
    wavelength made d_min -10.6 Å), so it raises ``ValueError`` (pydantic's
    ``ValidationError``) instead. The beam centre may lie off the detector.
    """

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    beam_x_px: float
    beam_y_px: float
    distance_m: float = Field(gt=0)
    wavelength_a: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)

    def d_spacing(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Resolution (Å) at pixel positions ``x`` (column), ``y`` (row)."""
        radius_m = np.hypot(x - self.beam_x_px, y - self.beam_y_px) * self.pixel_size_um * 1e-6
        two_theta = np.arctan2(radius_m, self.distance_m)
        with np.errstate(divide="ignore"):
            return self.wavelength_a / (2 * np.sin(two_theta / 2))

    def d_spacing_image(self, shape: tuple[int, int]) -> np.ndarray:
        rows, columns = np.indices(shape, dtype=np.float64)
        return self.d_spacing(columns, rows)


# -- spot finding -----------------------------------------------------------------


def _window_sum(values: np.ndarray, half: int) -> np.ndarray:
    """Sum over the (2 half + 1)^2 window around every pixel (zero outside the image)."""
    from scipy import ndimage

    size = 2 * half + 1
    return ndimage.uniform_filter(values, size=size, mode="constant") * (size * size)


def dispersion_threshold(
    image: np.ndarray,
    valid: np.ndarray,
    *,
    gain: float = 1.0,
    kernel_size: int = 3,
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    global_threshold: float = 0.0,
    min_local: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Strong pixels by the dispersion threshold (DIALS' default spot finder).

    Parameters
    ----------
    image : ndarray (rows, columns)
        Counts.
    valid : ndarray of bool
        Pixels to use (False: gaps, masked, saturated).

    Returns
    -------
    strong : ndarray of bool
        True where the pixel is strong: its window's variance/mean exceeds
        ``gain * (1 + sigma_background * sqrt(2 / (n - 1)))`` and the pixel
        exceeds the window mean by ``sigma_strong * sqrt(gain * mean)``.
    mean : ndarray
        The window means (the local background estimate).
    """
    counts = np.where(valid, image, 0).astype(np.float64)
    weight = valid.astype(np.float64)
    n = _window_sum(weight, kernel_size)
    total = _window_sum(counts, kernel_size)
    total_sq = _window_sum(counts * counts, kernel_size)
    enough = n >= min_local
    n_safe = np.where(enough, n, 2.0)
    mean = total / n_safe
    variance = (total_sq - total * mean) / (n_safe - 1)
    positive = mean > 0
    mean_safe = np.where(positive, mean, 1.0)
    dispersed = variance / mean_safe > gain * (1 + sigma_background * np.sqrt(2 / (n_safe - 1)))
    above = counts - mean > sigma_strong * np.sqrt(gain * mean_safe)
    strong = valid & enough & positive & dispersed & above & (counts > global_threshold)
    return strong, mean


@dataclass(frozen=True)
class Spots:
    """Spots of one image: centroid (px), counts above the local background, size (px)."""

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def select(self, keep: np.ndarray) -> Spots:
        return Spots(self.x[keep], self.y[keep], self.intensity[keep], self.size[keep])


def label_spots(
    strong: np.ndarray,
    image: np.ndarray,
    background: np.ndarray,
    min_size: int = 3,
    max_size: int = 1000,
) -> Spots:
    """Group strong pixels into 8-connected spots; measure them above ``background``.

    The centroid weighs each pixel by its counts above the background, so a
    spot's position does not lean towards the middle of its pixels.
    """
    from scipy import ndimage

    labels, count = ndimage.label(strong, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        empty = np.zeros(0)
        return Spots(empty, empty, empty, empty.astype(int))
    index = labels[strong]
    rows, columns = np.nonzero(strong)
    values = image[strong].astype(np.float64) - background[strong]
    weights = np.clip(values, 1e-9, None)
    size = np.bincount(index, minlength=count + 1)[1:]
    total = np.bincount(index, weights=values, minlength=count + 1)[1:]
    norm = np.bincount(index, weights=weights, minlength=count + 1)[1:]
    x = np.bincount(index, weights=weights * columns, minlength=count + 1)[1:] / norm
    y = np.bincount(index, weights=weights * rows, minlength=count + 1)[1:] / norm
    spots = Spots(x=x, y=y, intensity=total, size=size)
    return spots.select((size >= min_size) & (size <= max_size))


def find_spots(
    image: np.ndarray,
    valid: np.ndarray,
    *,
    gain: float = 1.0,
    kernel_size: int = 3,
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    global_threshold: float = 0.0,
    min_local: int = 2,
    min_spot_size: int = 3,
    max_spot_size: int = 1000,
) -> Spots:
    """Strong pixels (dispersion threshold), grouped into spots.

    ``valid`` is every pixel to use: not masked, not in a gap, not saturated,
    and at higher resolution than ``d_max_a`` (the caller builds the static part
    once per detector: ``geometry.d_spacing_image(shape) < d_max_a``).

    Parameters
    ----------
    image : ndarray (rows, columns)
        Counts.
    valid : ndarray of bool
        Pixels to use.
    gain, kernel_size, sigma_background, sigma_strong, global_threshold, min_local
        Of the dispersion threshold (see :func:`dispersion_threshold`); ``gain`` in
        counts per photon, ``kernel_size`` the window's half width in pixels,
        ``global_threshold`` in counts.
    min_spot_size, max_spot_size : int
        Spots kept, in pixels.

    Examples
    --------
    >>> image = np.random.default_rng(0).poisson(10.0, (64, 64))
    >>> image[30:32, 40:42] += 400
    >>> spots = find_spots(image, np.ones(image.shape, bool))
    >>> len(spots), round(float(spots.x[0]), 1), round(float(spots.y[0]), 1)
    (1, 40.5, 30.5)
    """
    strong, _ = dispersion_threshold(
        image,
        valid,
        gain=gain,
        kernel_size=kernel_size,
        sigma_background=sigma_background,
        sigma_strong=sigma_strong,
        global_threshold=global_threshold,
        min_local=min_local,
    )
    return label_spots(
        strong, image, local_background(image, valid, strong, kernel_size),
        min_spot_size, max_spot_size,
    )  # fmt: skip


def local_background(
    image: np.ndarray, valid: np.ndarray, strong: np.ndarray, kernel_size: int = 3
) -> np.ndarray:
    """Mean of the valid pixels around each pixel, leaving out spots and their rims.

    The dispersion threshold's own window mean includes the spot it tests, which
    would take part of every spot's counts away as "background".
    """
    from scipy import ndimage

    if not strong.any():
        return np.zeros(image.shape)
    quiet = valid & ~ndimage.binary_dilation(strong, iterations=1)
    half = kernel_size + 2
    n = _window_sum(quiet.astype(np.float64), half)
    total = _window_sum(np.where(quiet, image, 0).astype(np.float64), half)
    return np.where(n > 0, total / np.maximum(n, 1), 0.0)


# -- per-image indicators -----------------------------------------------------------


def resolution_estimate(d_spacings: np.ndarray, min_spots: int = 10) -> float:
    """The image's resolution limit: the d-spacing reached by the best 5% of its spots.

    Robust to a few noise spots at high angle (unlike the single best spot) and
    close to what DIALS' per-image analysis reports for strong images. NaN
    below ``min_spots`` spots.
    """
    d = np.asarray(d_spacings, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < min_spots:
        return math.nan
    return float(np.percentile(d, 5))


def ice_ring_counts(
    d_spacings: np.ndarray, d_min: float, d_max: float, width: float = 0.005, flank: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Spots on each ice ring (within ±``width`` relative d) in [d_min, d_max], and the
    count expected there from the spot density of the shells around it (±``flank``).

    The neighbouring shells set the expectation because the density of Bragg
    spots falls with resolution (Wilson): a uniform density would call the
    strong low-resolution shells "ice".
    """
    d = np.asarray(d_spacings, dtype=np.float64)
    d = d[np.isfinite(d) & (d >= d_min) & (d <= d_max)]
    rings = np.array([r for r in ICE_RINGS_A if d_min <= r <= d_max])
    if len(d) == 0 or len(rings) == 0:
        return np.zeros(len(rings)), np.zeros(len(rings))
    offset = np.abs(d[:, None] / rings[None, :] - 1)
    observed = (offset < width).sum(axis=0)
    around = ((offset >= width) & (offset < flank)).sum(axis=0)
    return observed.astype(float), around * width / (flank - width)


def has_ice_rings(d_spacings: np.ndarray, d_min: float, d_max: float, ratio: float) -> bool:
    """Ice: some ice ring holds at least 10 spots and ``ratio`` times its uniform share.

    Ice diffracts into powder rings at fixed d-spacings, which the spot finder
    sees as many spots on a thin shell; Bragg spots of the crystal spread over
    all resolutions.
    """
    observed, expected = ice_ring_counts(d_spacings, d_min, d_max)
    return bool(np.any((observed >= 10) & (observed > ratio * np.maximum(expected, 1e-9))))


@dataclass(frozen=True)
class ImageSummary:
    n_spots: int
    total_intensity: float
    d_min: float
    ice_rings: bool


def summarize_image(
    spots: Spots,
    geometry: DetectorGeometry,
    d_range: tuple[float, float],
    *,
    ice_ring_ratio: float = 4.0,
) -> tuple[ImageSummary, np.ndarray]:
    """Spot count, summed intensity, resolution estimate, ice flag; and the spots' d.

    ``d_range`` (Å) is the resolution range the valid pixels cover; an ice ring
    inside it with ``ice_ring_ratio`` times its share of spots flags ice (see
    :func:`has_ice_rings`).

    Examples
    --------
    >>> geometry = DetectorGeometry(beam_x_px=0, beam_y_px=0, distance_m=0.1,
    ...                             wavelength_a=1.0, pixel_size_um=100)
    >>> spots = Spots(np.array([100.0]), np.array([0.0]), np.array([50.0]), np.array([4]))
    >>> summary, d = summarize_image(spots, geometry, (1.0, 40.0))
    >>> summary.n_spots, d.round(2)
    (1, array([10.04]))
    """
    d = geometry.d_spacing(spots.x, spots.y)
    summary = ImageSummary(
        n_spots=len(spots),
        total_intensity=float(spots.intensity.sum()),
        d_min=resolution_estimate(d),
        ice_rings=has_ice_rings(d, d_range[0], d_range[1], ice_ring_ratio),
    )
    return summary, d


# -- per scan -----------------------------------------------------------------------


def hit_rate(n_spots: np.ndarray, min_spots: int) -> float:
    """Share of images with at least ``min_spots`` spots."""
    n_spots = np.asarray(n_spots)
    return float((n_spots >= min_spots).mean()) if len(n_spots) else 0.0


def grid_map(values: np.ndarray, shape: tuple[int, int], snake: bool = False) -> np.ndarray:
    """Per-image values of a grid scan as an image (rows, columns), in scan order.

    Raises
    ------
    ValueError
        When the grid does not hold exactly the number of images.
    """
    rows, columns = shape
    values = np.asarray(values, dtype=np.float64)
    if rows * columns != len(values):
        raise ValueError(
            f"a {rows}x{columns} grid holds {rows * columns} images, not {len(values)}"
        )
    grid = values.reshape(rows, columns).copy()
    if snake:
        grid[1::2] = grid[1::2, ::-1]
    return grid


def centring_position(heat: np.ndarray) -> tuple[int, int]:
    """The grid cell to centre on.

    Cells holding at least half the strongest value form connected regions;
    the crystal is the region with the most spots in total (one cell lit by a
    salt crystal or an ice chunk is a small region), and the answer is the cell
    of that region nearest to its spot-weighted centroid, so an elongated
    crystal is centred along its length.
    """
    from scipy import ndimage

    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    if heat.max() <= 0:
        raise ValueError("no spots anywhere in the grid: nothing to centre on")
    labels, count = ndimage.label(heat >= 0.5 * heat.max())
    totals = ndimage.sum_labels(heat, labels, index=np.arange(1, count + 1))
    region = labels == 1 + int(np.argmax(totals))
    rows, columns = np.nonzero(region)
    weights = heat[region]
    cy, cx = np.average(rows, weights=weights), np.average(columns, weights=weights)
    nearest = int(np.argmin((rows - cy) ** 2 + (columns - cx) ** 2))
    return int(rows[nearest]), int(columns[nearest])
