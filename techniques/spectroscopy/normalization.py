"""Edge energy and normalisation: E0, the pre-edge line and the post-edge step, as Athena does.

Relative energies (``pre1`` ... ``norm2``) are in eV from E0, with Larch's
meaning and defaults; energies in eV.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter1d

from calypso.errors import RawDataError
from calypso.techniques.spectroscopy.absorption import batch_rows

#: Highest degree of the post-edge polynomial.
MAX_NNORM = 3
#: Half width (eV) of the window around the steepest point where E0 is refined.
E0_WINDOW = 20.0
#: An edge must be this many times steeper than mu(E) 30 eV and more away from it.
MIN_EDGE_CONTRAST = 2.5
#: Below this edge step / noise, E0 is not trusted (see :func:`edge_noise_ratio`).
MIN_EDGE_NOISE_RATIO = 10.0
#: Above this spread (eV) of E0 between the even and the odd points, E0 is not decided.
MAX_E0_SPREAD = 1.0


def find_e0(energy: np.ndarray, mu: np.ndarray, smooth: float = 0.5) -> np.ndarray:
    """Edge energy of each spectrum: the maximum of the smoothed derivative dmu/dE.

    A first guess is the steepest step on the measured grid (the ends of the
    scan, 2% of the points each side, are ignored: glitches live there). Around
    it (±``E0_WINDOW`` eV) the spectrum is put on a uniform grid (the smallest
    energy step, at least 0.05 eV), differentiated and smoothed by a Gaussian of
    ``smooth`` eV; the maximum is refined between grid points by a parabola.

    Returns
    -------
    numpy.ndarray
        E0 in eV, one per spectrum.
    """
    energy, mu = batch_rows(energy, mu)
    n, m = mu.shape
    rows = np.arange(n)
    slope = np.diff(mu, axis=1) / np.diff(energy, axis=1)
    slope = (slope[:, :-2] + slope[:, 1:-1] + slope[:, 2:]) / 3.0  # centred on points 1..m-2
    skip = max(3, int(0.02 * m))
    guess = energy[rows, 1 + skip + np.argmax(slope[:, skip:-skip], axis=1)]
    step = max(float(np.min(np.diff(energy, axis=1))), 0.05)
    half = max(E0_WINDOW, 10 * smooth)
    grid = guess[:, None] + step * np.arange(-int(half / step), int(half / step) + 1)
    uniform = np.empty(grid.shape)
    for row in range(n):
        uniform[row] = np.interp(grid[row], energy[row], mu[row])
    derivative = np.gradient(uniform, step, axis=1)
    if smooth > 0:
        derivative = gaussian_filter1d(derivative, smooth / step, axis=1, mode="nearest")
    edge = max(1, int(smooth / step))  # the smoothing is not trusted at the window's ends
    inner = derivative[:, edge:-edge]
    peak = np.argmax(inner, axis=1)
    left = inner[rows, np.maximum(peak - 1, 0)]
    centre = inner[rows, peak]
    right = inner[rows, np.minimum(peak + 1, inner.shape[1] - 1)]
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    return grid[rows, edge + peak] + np.clip(offset, -0.5, 0.5) * step


def edge_contrast(energy: np.ndarray, mu: np.ndarray, e0: np.ndarray) -> np.ndarray:
    """How much steeper mu(E) is at E0 than anywhere 30 eV or more away from it.

    Slopes are measured against the spectrum's background trend (the median
    slope), so a small edge on a steep background (a dilute sample in
    transmission, a fluorescence channel with scatter) counts by its own
    height. Measured on the real spectra of the test data: 2.8 to 44 across an
    edge; 0.2 to 2.3 for the same scans cut 90 eV above it (E0 then lands on an
    EXAFS wiggle). Slopes are taken over 2.5 eV, so counting noise does not count.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7400.0, 251)
    >>> mu = 1.0 - 1e-3 * (energy - 6900) + 0.3 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> bool(edge_contrast(energy, mu, np.array([7112.0]))[0] > 10)
    True
    """
    energy, mu = batch_rows(energy, mu)
    # Slopes over 2.5 eV, not point to point: fine edge steps must not turn
    # counting noise into steep slopes.
    base = 2.5
    grid = np.arange(float(energy[:, 0].max()), float(energy[:, -1].min()), base)
    if grid.size < 3:
        return np.full(mu.shape[0], np.inf)
    coarse = np.stack([np.interp(grid, e, m) for e, m in zip(energy, mu, strict=True)])
    slope = np.diff(coarse, axis=1) / base
    slope = np.abs(slope - np.median(slope, axis=1, keepdims=True))
    distance = np.abs(0.5 * (grid[1:] + grid[:-1]) - np.asarray(e0).reshape(-1, 1))
    ends = np.zeros(slope.shape[1], dtype=bool)  # glitches at the scan's ends do not count
    skip = max(2, int(0.03 * slope.shape[1]))
    ends[:skip] = ends[-skip:] = True
    near = np.where(distance <= 5.0, slope, 0.0).max(axis=1)
    far = np.where((distance >= 30.0) & ~ends, slope, 0.0).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(far > 0, near / far, np.inf)


def e0_spread(energy: np.ndarray, mu: np.ndarray, smooth: float = 0.5) -> np.ndarray:
    """How far apart (eV) :func:`find_e0` puts E0 on the even and on the odd points.

    The two halves carry independent noise: on a clean spectrum they agree within
    a tenth of an eV; where noise decides between two derivative peaks of nearly
    the same height (a pre-edge shoulder, a white line), they part by the distance
    between the peaks, and so would any two algorithms (Larch's ``find_e0`` and
    this one). Over ``MAX_E0_SPREAD``, E0 is not decided by the data.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7400.0, 501)
    >>> mu = 0.2 + 1.0 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> bool(e0_spread(energy, mu)[0] < 0.1)
    True
    """
    energy, mu = batch_rows(energy, mu)
    if energy.shape[1] < 40:  # too few points to halve
        return np.zeros(mu.shape[0])
    even = find_e0(energy[:, ::2], mu[:, ::2], smooth)
    odd = find_e0(energy[:, 1::2], mu[:, 1::2], smooth)
    return np.abs(even - odd)


def edge_noise_ratio(energy: np.ndarray, mu: np.ndarray, edge_step: np.ndarray) -> np.ndarray:
    """The edge step in units of mu(E)'s point-to-point noise: a figure of merit of E0.

    The noise is the robust spread (median absolute deviation) of second
    differences, which for white noise is sqrt(6) times the noise of a point;
    real structure on a coarse grid only adds to it, so the figure errs low.
    Larch and Calypso agree on E0 within 0.5 eV above ``MIN_EDGE_NOISE_RATIO``.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7400.0, 501)
    >>> mu = 0.2 + 1.0 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> noisy = mu + np.random.default_rng(0).normal(0, 0.01, 501)
    >>> bool(70 < edge_noise_ratio(energy, noisy, np.array([1.0]))[0] < 130)
    True
    """
    energy, mu = batch_rows(energy, mu)
    second = mu[:, 2:] - 2 * mu[:, 1:-1] + mu[:, :-2]
    spread = 1.4826 * np.median(np.abs(second - np.median(second, axis=1, keepdims=True)), axis=1)
    noise = spread / np.sqrt(6.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(noise > 0, np.abs(edge_step) / noise, np.inf)


@dataclass(frozen=True)
class EdgeRanges:
    """Fit ranges relative to E0 (eV) and the post-edge polynomial degree."""

    pre1: float
    pre2: float
    norm1: float
    norm2: float
    nnorm: int


def _round_to(value: float, step: float) -> float:
    return step * round(value / step)


def edge_ranges(
    energy: np.ndarray,
    e0: float,
    *,
    pre1: float | None = None,
    pre2: float | None = None,
    norm1: float | None = None,
    norm2: float | None = None,
    nnorm: int | None = None,
) -> EdgeRanges:
    """The fit ranges: those given, else Larch's defaults for this data range.

    Defaults: the pre-edge line from the second point (rounded to 5 eV) to half
    way to E0; the post-edge from min(25, 5·round(norm2/15)) to the end of
    the data (rounded to 5 eV), a quadratic over 300 eV or more, a line over
    30 eV or more, a constant below.

    Parameters
    ----------
    energy : (m,) array
        Photon energy (eV) of one spectrum, increasing.
    e0 : float
        Its edge energy (eV).
    pre1, pre2 : float, optional
        Range of the pre-edge line, eV from E0.
    norm1, norm2 : float, optional
        Range of the post-edge polynomial, eV from E0 (a negative ``norm2``: the data's end).
    nnorm : int, optional
        Degree of the post-edge polynomial, 0 to ``MAX_NNORM``.

    Examples
    --------
    >>> edge_ranges(np.linspace(6900.0, 7900.0, 501), 7112.0)
    EdgeRanges(pre1=-210.0, pre2=-105.0, norm1=25.0, norm2=788.0, nnorm=2)
    """
    e = np.asarray(energy, dtype=np.float64)
    first, last = float(e[0]), float(e[-1])
    if pre1 is None:
        below = np.count_nonzero(e < e0)
        pre1 = _round_to(e[1] - e0, 5.0 if below > 20 else 2.0)
    pre1 = max(pre1, first - e0)
    pre2 = pre2 if pre2 is not None else 0.5 * pre1
    pre1, pre2 = min(pre1, pre2), max(pre1, pre2)
    if norm2 is None:
        norm2 = _round_to(last - e0, 5.0)
    elif norm2 < 0:
        norm2 = last - e0 - norm2
    norm2 = min(norm2, last - e0)
    if norm1 is None:
        # Larch's 5.0*round(norm2/15.0): norm2/3 to 5 eV, not norm2/15 (which put norm1
        # at 15 eV on XANES scans and moved their edge step by 2%).
        norm1 = min(25.0, 5.0 * round(norm2 / 15.0))
    norm1, norm2 = min(norm1, norm2), max(norm1, norm2)
    norm1 = min(norm1, norm2 - 2)
    if nnorm is None:
        nnorm = 2 if norm2 - norm1 >= 300 else 1 if norm2 - norm1 >= 30 else 0
    return EdgeRanges(pre1=pre1, pre2=pre2, norm1=norm1, norm2=norm2, nnorm=nnorm)


def _index_range(
    energy: np.ndarray, start: np.ndarray, stop: np.ndarray, minimum: int
) -> np.ndarray:
    """Row-wise masks of the points from the last one at or below ``start`` to before the one
    nearest ``stop`` (Larch's ``index_of`` and ``index_nearest``), at least ``minimum`` long."""
    columns = np.arange(energy.shape[1])
    first = np.maximum(np.sum(energy <= start[:, None], axis=1) - 1, 0)
    first = np.minimum(first, energy.shape[1] - 3)
    last = np.argmin(np.abs(energy - stop[:, None]), axis=1)
    last = np.minimum(np.maximum(last, first + minimum), energy.shape[1])
    return (columns >= first[:, None]) & (columns < last[:, None])


def _powers(x: np.ndarray, degree: int) -> np.ndarray:
    """x**0 .. x**degree stacked on a last axis (by products: ``**`` is slow on big arrays)."""
    powers = np.empty((*x.shape, degree + 1))
    powers[..., 0] = 1.0
    for j in range(1, degree + 1):
        np.multiply(powers[..., j - 1], x, out=powers[..., j])
    return powers


def _masked_polyfit(x: np.ndarray, y: np.ndarray, mask: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares polynomials (coefficients of x**0 .. x**degree) over ``mask``, row by row."""
    powers = _powers(x, degree) * mask[..., None]  # (n, m, degree + 1), zero outside the mask
    normal = np.einsum("nmi,nmj->nij", powers, powers)
    rhs = np.einsum("nmi,nm->ni", powers, y)
    return np.linalg.solve(normal, rhs[..., None])[..., 0]


def _polyval(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise polynomials (Horner), ``coefficients`` (n, degree + 1) at ``x`` (n, m)."""
    values = np.broadcast_to(coefficients[:, -1:], x.shape).copy()
    for j in range(coefficients.shape[1] - 2, -1, -1):
        values *= x
        values += coefficients[:, j : j + 1]
    return values


@dataclass(frozen=True)
class Normalization:
    """Pre-edge subtraction and post-edge normalisation of a batch of spectra."""

    e0: np.ndarray  # (n,) eV
    edge_step: np.ndarray  # (n,)
    pre_edge: np.ndarray  # (n, m) the pre-edge line
    post_edge: np.ndarray  # (n, m) the post-edge curve (pre-edge line + polynomial)
    norm: np.ndarray  # (n, m) (mu - pre_edge) / edge_step
    flat: np.ndarray  # (n, m) norm with the post-edge curvature removed above E0
    pre_coefficients: np.ndarray  # (n, 2): offset, slope of mu·E^nvict (E in eV)
    post_coefficients: np.ndarray  # (n, nnorm + 1): polynomial in (E - E0) of mu - pre_edge
    ranges: EdgeRanges
    edge_noise: np.ndarray  # (n,) edge step / noise: below MIN_EDGE_NOISE_RATIO, E0 is unsure
    e0_spread: np.ndarray  # (n,) eV, E0 on even vs odd points: over MAX_E0_SPREAD, undecided


def normalize(
    energy: np.ndarray,
    mu: np.ndarray,
    *,
    e0: float | np.ndarray | None = None,
    e0_smooth: float = 0.5,
    pre1: float | None = None,
    pre2: float | None = None,
    norm1: float | None = None,
    norm2: float | None = None,
    nnorm: int | None = None,
    nvict: float = 0.0,
    where: str = "spectrum",
) -> Normalization:
    """Subtract a pre-edge line and divide by the edge step, as Athena does.

    Parameters
    ----------
    energy : (m,) or (n, m) array
        Photon energy in eV, strictly increasing.
    mu : (n, m) or (m,) array
        Absorption.
    e0 : float or (n,) array, optional
        Edge energy (eV): one for every spectrum or one each; default: found
        by :func:`find_e0`.
    e0_smooth : float
        Gaussian width (eV) of the derivative smoothing of :func:`find_e0`.
    pre1, pre2, norm1, norm2 : float, optional
        Fit ranges, eV from E0; default: Larch's (see :func:`edge_ranges`).
    nnorm : int, optional
        Degree of the post-edge polynomial; default: from the post-edge range.
    nvict : float
        Energy exponent of the pre-edge fit (Victoreen): the line fits mu·E^nvict.
    where : str
        Names the data in error messages.

    Raises
    ------
    RawDataError
        When the energy range does not cover the edge and the fit ranges.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 501)
    >>> mu = 0.2 + 1e-5 * (energy - 6900) + 1.5 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> normalization = normalize(energy, mu)
    >>> normalization.e0.round(1), normalization.edge_step.round(2)
    (array([7112.]), array([1.5]))
    """
    energy, mu = batch_rows(energy, mu)
    n = mu.shape[0]
    found = e0 is None
    if e0 is None:
        e0 = find_e0(energy, mu, e0_smooth)
    elif np.ndim(e0) == 0:
        e0 = np.full(n, float(e0))
    e0 = np.asarray(e0, dtype=np.float64).reshape(n)
    if np.any(e0 <= energy[:, 0]) or np.any(e0 >= energy[:, -1]):
        raise RawDataError(
            f"{where}: E0 {float(np.median(e0)):.1f} eV is outside the scanned range "
            f"{energy[0, 0]:.1f}-{energy[0, -1]:.1f} eV: the scan does not cover the edge"
        )
    contrast = edge_contrast(energy, mu, e0)
    if np.any(contrast < MIN_EDGE_CONTRAST):
        row = int(np.argmin(contrast))
        falling = find_e0(energy[row], -mu[row], e0_smooth)
        if edge_contrast(energy[row], -mu[row], falling)[0] >= MIN_EDGE_CONTRAST:
            raise RawDataError(
                f"{where}: mu(E) falls across the edge at {falling[0]:.1f} eV instead of rising: "
                "I0 and It are swapped, or these columns are not the sample's absorption; choose "
                "them with --set i0=COLUMN --set it=COLUMN (or mu_column, fluorescence)"
            )
        raise RawDataError(
            f"{where}: no absorption edge in the scanned range {energy[row, 0]:.1f}-"
            f"{energy[row, -1]:.1f} eV (the steepest point, {e0[row]:.1f} eV, is only "
            f"{contrast[row]:.1f} times steeper than the rest): the scan does not cover the edge; "
            "measure across it or give e0 (or, for a dilute sample, choose the channels where its "
            "edge is: --set fluorescence=...)"
        )
    reference = int(np.argmin(np.abs(e0 - np.median(e0))))
    ranges = edge_ranges(
        energy[reference],
        float(e0[reference]),
        pre1=pre1,
        pre2=pre2,
        norm1=norm1,
        norm2=norm2,
        nnorm=nnorm,
    )
    relative = energy - e0[:, None]
    rows = np.arange(n)
    nearest = np.argmin(np.abs(relative), axis=1)
    # Larch's index conventions, so the same ranges select the same points: a
    # range starts at the last point at or below its start and stops before the
    # point nearest its end; the step is read at the point nearest E0. Larch's
    # own E0 is a measured point, so a found E0 counts the ranges from the
    # measured point nearest it: else a range's end may fall either side of a
    # point (on a 10 eV pre-edge grid, whether the first point is in the line).
    anchor = energy[rows, nearest] if found else e0
    pre_mask = _index_range(energy, anchor + ranges.pre1, anchor + ranges.pre2, minimum=2)
    post_mask = _index_range(energy, anchor + ranges.norm1, anchor + ranges.norm2, minimum=2)
    n_pre, n_post = pre_mask.sum(axis=1).min(), post_mask.sum(axis=1).min()
    if n_pre < 2:
        raise RawDataError(
            f"{where}: only {n_pre} point(s) between E0{ranges.pre1:+.0f} and "
            f"E0{ranges.pre2:+.0f} eV for the pre-edge line: the scan starts too close to the "
            "edge (E0 {:.1f} eV); set pre1/pre2 or measure further below the edge".format(
                float(e0[reference])
            )
        )
    if n_post < 2:
        raise RawDataError(
            f"{where}: only {n_post} point(s) between E0+{ranges.norm1:.0f} and "
            f"E0+{ranges.norm2:.0f} eV for the post-edge fit: the scan ends too close to the "
            "edge; set norm1/norm2/nnorm or measure further above the edge"
        )
    if n_post < 5 and ranges.nnorm > 1:  # as Larch: few points bear a line at most
        ranges = replace(ranges, nnorm=1 if n_post > 2 else 0)
    victoreen = energy**nvict
    pre_coefficients = _masked_polyfit(energy / 1e3, mu * victoreen, pre_mask, 1)
    pre_edge = _polyval(pre_coefficients, energy / 1e3) / victoreen
    pre_coefficients = pre_coefficients * np.array([1.0, 1e-3])  # slope per eV
    post_x = relative / 1e3
    post_coefficients = _masked_polyfit(post_x, mu - pre_edge, post_mask, ranges.nnorm)
    polynomial = _polyval(post_coefficients, post_x)
    post_edge = pre_edge + polynomial
    step = polynomial[rows, nearest]  # post-edge minus pre-edge at the point nearest E0
    if np.any(~np.isfinite(step)) or np.any(np.abs(step) < 1e-12):
        raise RawDataError(f"{where}: no edge step (the spectrum is flat across E0)")
    step = np.abs(step)
    norm = (mu - pre_edge) / step[:, None]
    above = np.arange(energy.shape[1]) >= nearest[:, None]
    flat = norm - np.where(above, (polynomial - step[:, None]) / step[:, None], 0.0)
    post_coefficients = post_coefficients * (1e-3 ** np.arange(ranges.nnorm + 1))
    return Normalization(
        e0=e0,
        edge_step=step,
        pre_edge=pre_edge,
        post_edge=post_edge,
        norm=norm,
        flat=flat,
        pre_coefficients=pre_coefficients,
        post_coefficients=post_coefficients,
        ranges=ranges,
        edge_noise=edge_noise_ratio(energy, mu, step),
        e0_spread=e0_spread(energy, mu, e0_smooth) if found else np.zeros(n),
    )
