"""Centre of rotation: where the rotation axis falls on the detector, by Vo's double-wedge metric.

Vo et al. 2014, with algotom's implementation of the metric; angles in radians,
positions in detector columns (0 = the first column's centre).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COARSE_SEARCH_WIDTH = 256  # columns of the binned sinogram of the whole-pixel axis search


@dataclass(frozen=True)
class CenterOfRotation:
    """Where the rotation axis is, and how sure the search is.

    ``confidence`` is the depth of the metric's minimum relative to its median
    over the fine search window: near 1 for a sharp, unique minimum, near 0
    when the metric is flat (no structure, wrong angular range).
    """

    value: float
    confidence: float
    method: str


def half_turn(angles: np.ndarray) -> np.ndarray:
    """Indices of the projections covering the first 180 degrees of ``angles`` (radians).

    Raises
    ------
    ValueError
        When the angles cover less than about 180 degrees.
    """
    angles = np.asarray(angles, dtype=np.float64)
    span = abs(angles[-1] - angles[0])
    step = span / max(len(angles) - 1, 1)
    if span + step < math.pi * 0.98:
        raise ValueError(
            f"the projections cover {math.degrees(span + step):.1f} degrees; the centre of "
            "rotation search and the reconstruction need 180 (or 360)"
        )
    covered = np.abs(angles - angles[0]) < math.pi - 0.5 * step
    return np.flatnonzero(covered)


def find_center_of_rotation(
    sinogram: np.ndarray, angles: np.ndarray, search: float | None = None
) -> CenterOfRotation:
    """Find the rotation axis on one sinogram (Vo et al. 2014, double-wedge metric).

    algotom's metric, searched in whole pixels on a copy binned to about
    256 columns, then in quarter pixels around the answer, refined by a parabola.

    Parameters
    ----------
    sinogram : ndarray, shape (angles, columns)
        Line integrals (after -log), at least 180 degrees.
    angles : ndarray, shape (angles,)
        Projection angles, radians.
    search : float, optional
        Half width of the search window around the detector centre, pixels
        (default: an eighth of the width).

    Returns
    -------
    CenterOfRotation
        The axis position in columns (0 = centre of the first column).
    """
    import warnings

    from algotom.prep.calculation import (
        calculate_center_metric,
        coarse_search_cor,
        make_inverse_double_wedge_mask,
    )
    from scipy import ndimage

    sino = np.asarray(sinogram, dtype=np.float32)[half_turn(angles)]
    if np.ptp(sino) <= 0:
        raise ValueError("the sinogram is flat: no object to find the rotation axis on")
    # The metric costs one 2D FFT of the sinogram per trial position: search
    # whole pixels on a binned copy, then quarter pixels near the answer with
    # the full column resolution and at most ~360 angles.
    angle_step = max(1, sino.shape[0] // 360)
    sino = sino[::angle_step]
    n_angles, width = sino.shape
    binning = max(1, width // COARSE_SEARCH_WIDTH)
    middle = (width - 1) / 2
    radius = search if search is not None else max(width / 8, 8)
    start, stop = max(middle - radius, 1), min(middle + radius, width - 2)

    def binned(column: float) -> float:  # column of the binned sinogram holding ``column``
        return (column - (binning - 1) / 2) / binning

    coarse = sino[:, : width // binning * binning].reshape(n_angles, -1, binning).mean(axis=2)
    first, last = math.ceil(binned(start)), math.floor(binned(stop))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an edge minimum is reported below, with advice
        found = float(coarse_search_cor(coarse, first, last, ratio=0.5, denoise=True, ncore=1))
    if found <= first or found >= last:
        raise ValueError(
            f"the centre of rotation search found its best value at the edge of the window "
            f"[{start:.0f}, {stop:.0f}] columns: the axis may be outside it; widen cor_search "
            "or give center_of_rotation"
        )
    center = found * binning + (binning - 1) / 2
    smooth = ndimage.gaussian_filter(sino, (2, 2), mode="reflect")
    flipped, complement = np.fliplr(smooth), np.flipud(smooth)
    mask = make_inverse_double_wedge_mask(2 * n_angles, width, 0.25 * width)
    half = max(4.0, binning + 1.0)
    grid = np.clip(center + np.arange(-half, half + 0.125, 0.25), 0, width - 1)
    metric = np.array([calculate_center_metric(c, smooth, flipped, complement, mask) for c in grid])
    best = int(np.argmin(metric))
    near = metric[np.abs(grid - grid[best]) <= 4.0]
    median = float(np.median(near))
    confidence = 0.0 if median <= 0 else float(np.clip(1 - metric[best] / median, 0, 1))
    center = float(grid[best])
    if 0 < best < len(grid) - 1:
        # The vertex of the parabola through the minimum and its neighbours
        # gives the axis to better than the grid step.
        left, lowest, right = metric[best - 1 : best + 2]
        curvature = left - 2 * lowest + right
        if curvature > 0:
            center += 0.25 * 0.5 * (left - right) / curvature
    return CenterOfRotation(value=center, confidence=confidence, method="vo")
