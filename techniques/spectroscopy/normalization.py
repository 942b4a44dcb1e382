"""Normalisation: the pre-edge line and the post-edge step, as Athena does (E0: :mod:`.edge`).

Relative energies (``pre1`` ... ``norm2``) are in eV from E0, with Larch's
meaning and defaults; energies in eV.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from calypso.errors import RawDataError
from calypso.techniques.spectroscopy.absorption import batch_rows, row_blocks
from calypso.techniques.spectroscopy.edge import (
    MIN_EDGE_CONTRAST,
    MIN_POST_EDGE_EV,
    e0_spread,
    edge_contrast,
    edge_noise_ratio,
    edge_rise,
    find_e0,
    has_edge,
)

#: Highest degree of the post-edge polynomial.
MAX_NNORM = 3


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


@dataclass(frozen=True)
class EdgeFrame:
    """What the normalisation of a batch decides over all its spectra, before any is
    normalised (:func:`edge_frame`): each one's E0 and the fit ranges they share."""

    e0: np.ndarray  # (n,) eV
    found: bool  # E0 found by :func:`find_e0` (else given)
    ranges: EdgeRanges
    e0_spread: np.ndarray  # (n,) eV; zeros where E0 was given

    def rows(self, rows: slice) -> EdgeFrame:
        """The frame of some of the batch's spectra: theirs, reduced as part of the batch."""
        return replace(self, e0=self.e0[rows], e0_spread=self.e0_spread[rows])


def edge_frame(
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
    where: str = "spectrum",
) -> EdgeFrame:
    """E0 of each spectrum, checked, and the batch's fit ranges: :func:`normalize`'s first
    half, done a block of spectra at a time (parameters and errors as :func:`normalize`'s).

    The ranges are those of the spectrum whose E0 is nearest the batch's median, with
    the post-edge polynomial's degree lowered where a spectrum has too few points for it.
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
    if np.any(e0 > energy[:, -1] - MIN_POST_EDGE_EV):
        row = int(np.argmax(e0 - energy[:, -1]))
        raise RawDataError(
            f"{where}: the scan ends {energy[row, -1] - e0[row]:.1f} eV above E0 "
            f"({e0[row]:.1f} eV): it stops on the edge, with no post-edge to normalise "
            f"against; measure at least {MIN_POST_EDGE_EV:.0f} eV above the edge"
        )
    # E0 given is the user's word for where the edge is (the refusal below says to give it):
    # only an edge found is checked.
    contrast = edge_contrast(energy, mu, e0) if found else np.full(n, np.inf)
    edge = has_edge(energy, mu, e0, contrast) if found else np.ones(n, dtype=bool)
    if not edge.all():
        row = int(np.argmin(np.where(edge, np.inf, contrast)))
        if contrast[row] >= MIN_EDGE_CONTRAST:  # steep enough: the slopes had little to see
            rise = edge_noise_ratio(energy[row], mu[row], edge_rise(energy[row], mu[row], e0[row]))
            raise RawDataError(
                f"{where}: no absorption edge the scan can show: it has few points or none 30 "
                f"eV from E0 ({e0[row]:.1f} eV) to compare the edge's slope with, and mu(E) "
                f"rises across it only {rise[0]:.1f} times its noise; merge repeats, choose the "
                "channels (--set fluorescence=..., --set it=...), or give e0"
            )
        falling = find_e0(energy[row], -mu[row], e0_smooth)
        if edge_contrast(energy[row], -mu[row], falling)[0] >= MIN_EDGE_CONTRAST:
            raise RawDataError(
                f"{where}: mu(E) falls across the edge at {falling[0]:.1f} eV instead of rising: "
                "I0 and It are swapped, the file's column names are shifted against its values "
                "(a heading of two words read as two names), or these columns are not the "
                "sample's absorption; choose them with --set i0=COLUMN --set it=COLUMN (or "
                "mu_column, fluorescence)"
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
    n_pre = n_post = mu.shape[1]
    for rows in row_blocks(n):
        pre_mask, post_mask, _ = _fit_masks(energy[rows], e0[rows], found, ranges)
        n_pre = min(n_pre, pre_mask.sum(axis=1).min())
        n_post = min(n_post, post_mask.sum(axis=1).min())
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
    spread = e0_spread(energy, mu, e0_smooth) if found else np.zeros(n)
    return EdgeFrame(e0=e0, found=found, ranges=ranges, e0_spread=spread)


def _fit_masks(
    energy: np.ndarray, e0: np.ndarray, found: bool, ranges: EdgeRanges
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points of the pre-edge and post-edge fits, and the point nearest E0, row by row.

    Larch's index conventions, so the same ranges select the same points: a range
    starts at the last point at or below its start and stops before the point nearest
    its end; the step is read at the point nearest E0. Larch's own E0 is a measured
    point, so a found E0 counts the ranges from the measured point nearest it: else a
    range's end may fall either side of a point (on a 10 eV pre-edge grid, whether the
    first point is in the line).
    """
    nearest = np.argmin(np.abs(energy - e0[:, None]), axis=1)
    anchor = energy[np.arange(energy.shape[0]), nearest] if found else e0
    pre_mask = _index_range(energy, anchor + ranges.pre1, anchor + ranges.pre2, minimum=2)
    post_mask = _index_range(energy, anchor + ranges.norm1, anchor + ranges.norm2, minimum=2)
    return pre_mask, post_mask, nearest


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
    frame: EdgeFrame | None = None,
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
    frame : EdgeFrame, optional
        These spectra's E0s and fit ranges, decided over the batch they belong to
        (``edge_frame(...).rows(...)``); then ``e0`` ... ``nnorm`` are not used.
        Default: :func:`edge_frame` of these spectra.

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
    if frame is None:
        frame = edge_frame(
            energy,
            mu,
            e0=e0,
            e0_smooth=e0_smooth,
            pre1=pre1,
            pre2=pre2,
            norm1=norm1,
            norm2=norm2,
            nnorm=nnorm,
            where=where,
        )
    e0, ranges = frame.e0, frame.ranges
    pre_mask, post_mask, nearest = _fit_masks(energy, e0, frame.found, ranges)
    relative = energy - e0[:, None]
    rows = np.arange(mu.shape[0])
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
        e0_spread=frame.e0_spread,
    )
