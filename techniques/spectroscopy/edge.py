"""The absorption edge: E0 and how far it can be trusted (the edge's contrast, noise and
the spread of E0 between halves of the points).

Energies in eV; arrays of a batch are rows (:func:`~calypso.techniques.spectroscopy.
absorption.batch_rows`), worked on a block of spectra at a time where the temporaries
would grow with the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.ndimage import gaussian_filter1d

from calypso.techniques.spectroscopy.absorption import batch_rows, row_blocks

#: Half width (eV) of the window around the steepest point where E0 is refined.
E0_WINDOW = 20.0
#: An edge must be this many times steeper than mu(E) 30 eV and more away from it
#: (:func:`edge_contrast`, which says what it separates).
MIN_EDGE_CONTRAST = 2.5
#: :func:`edge_contrast` measures slopes over this many eV, taken every
#: ``SLOPE_EV / SLOPE_PHASES`` eV.
SLOPE_EV = 2.5
SLOPE_PHASES = 3
#: A point this many times its spectrum's noise from its neighbours' median is a glitch
#: to :func:`edge_contrast`.
GLITCH_NOISE = 6.0
#: Below this edge step / noise, E0 is not trusted (see :func:`edge_noise_ratio`).
MIN_EDGE_NOISE_RATIO = 10.0
#: A scan must go on this far (eV) above E0: closer to its end, it stops on the edge,
#: with no post-edge to normalise against (the edge itself rises over several eV).
MIN_POST_EDGE_EV = 10.0
#: An edge step over this many times mu(E)'s whole range (1st to 99th percentile) is no
#: edge's: the pre- and post-edge lines were fitted to noise. Measured on 41 real spectra
#: (the test data and 13 files of other beamlines): 0.12 to 1.04; on three noise channels
#: of a short XANES scan, whose edge test has no points 30 eV away to judge by: 3.3-4.1.
MAX_STEP_TO_RANGE = 2.0
#: Above this spread (eV) of E0 between the even and the odd points, E0 is not decided.
MAX_E0_SPREAD = 1.0


def find_e0(energy: np.ndarray, mu: np.ndarray, smooth: float = 0.5) -> np.ndarray:
    """Edge energy of each spectrum: the maximum of the smoothed derivative dmu/dE.

    A first guess is the steepest step on the measured grid, not a glitch's (the ends of
    the scan, 2% of the points each side, are ignored: glitches live there). Around
    it (±``E0_WINDOW`` eV) the spectrum is put on a uniform grid (the smallest
    energy step, at least 0.05 eV), differentiated and smoothed by a Gaussian of
    ``smooth`` eV; the maximum is refined between grid points by a parabola.

    The grid step is the batch's smallest energy step: the same for every spectrum of
    the batch, whichever rows it is worked on with (a block at a time, so the
    temporaries stay small whatever the batch's size).

    Returns
    -------
    numpy.ndarray
        E0 in eV, one per spectrum.
    """
    energy, mu = batch_rows(energy, mu)
    step = _grid_step(energy)
    e0 = np.empty(mu.shape[0])
    for rows in row_blocks(mu.shape[0]):
        e0[rows] = _steepest_point(energy[rows], mu[rows], smooth, step)
    return e0


def _grid_step(energy: np.ndarray) -> float:
    """The smallest energy step of a batch (rows), at least 0.05 eV."""
    smallest = [np.min(np.diff(energy[rows], axis=1)) for rows in row_blocks(energy.shape[0])]
    return max(float(np.min(smallest)), 0.05)


def _steepest_point(energy: np.ndarray, mu: np.ndarray, smooth: float, step: float) -> np.ndarray:
    """:func:`find_e0` of rows, on a grid of ``step`` eV."""
    n, m = mu.shape
    rows = np.arange(n)
    skip = max(3, int(0.02 * m))
    index, steps = _steepest_steps(energy, mu, skip)
    # A glitch (one point off, a monochromator's or a detector's) is no edge: its steps go
    # up then down, where an edge's all rise, so the median of the three is no steep one.
    # Those rows are looked at again with their glitches out: one in It made a U L3 scan's
    # steepest step 200 eV above its edge, and the scan was refused as not covering it.
    # (Every row with its glitches out: 12% more of a batch's normalisation.)
    spiky = np.median(steps, axis=1) < 0.5 * steps.mean(axis=1)
    if spiky.any():
        index[spiky] = _steepest_steps(energy[spiky], _without_glitches(mu[spiky]), skip)[0]
    guess = energy[rows, 1 + index]
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


def _steepest_steps(energy: np.ndarray, mu: np.ndarray, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's steepest mean of three steps (``skip`` points at each end left out): its
    index (the steps ``index`` to ``index + 2``, centred on point ``index + 1``) and the
    three steps."""
    step = np.diff(mu, axis=1) / np.diff(energy, axis=1)
    slope = (step[:, :-2] + step[:, 1:-1] + step[:, 2:]) / 3.0
    index = skip + np.argmax(slope[:, skip:-skip], axis=1)
    rows = np.arange(mu.shape[0])[:, None]
    return index, step[rows, index[:, None] + np.arange(3)]


def edge_contrast(energy: np.ndarray, mu: np.ndarray, e0: np.ndarray) -> np.ndarray:
    """How much steeper mu(E) is at E0 than anywhere 30 eV or more away from it.

    Slopes are secants over 2.5 eV (``SLOPE_EV``), so counting noise does not count,
    measured against the spectrum's background trend (the median slope), so a small
    edge on a steep background (a dilute sample in transmission, a fluorescence channel
    with scatter) counts by its own height. They are taken every third of that
    (``SLOPE_PHASES``): on a 2.5 eV lattice, where the lattice fell decided by up to 25%
    (an Fe foil's 3.0 came out anywhere from 2.4 to 3.1, refused at 8% of phases; a Mo
    foil with noise of 1% of its edge step, 2.5). Measured on the real spectra of the
    test data, whatever the lattice's phase: 3.0 to 75 across an edge, 2.6 and more
    with noise of 1% of the edge step; 0.4 to 2.7 for the same scans cut 60 and 88 eV
    above it, where E0 lands on an EXAFS wiggle (up to 7.8 on the old lattice). An Fe
    foil's strong EXAFS makes it the hard case on both sides (3.0 across its edge, 2.5
    cut 88 eV above it): a scan starting that close above an edge is not always told
    from one across it. The slopes are of mu(E) with its glitches taken out
    (:func:`_without_glitches`): one point 20% of the edge step off, 150 eV above an Fe
    foil's edge, made it 1.0 (refused); now 3.0. Of 20,000 spectra of pure noise, none
    passes (white noise) or 2.6% (a random walk; 3.9% on the old lattice).

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7400.0, 251)
    >>> mu = 1.0 - 1e-3 * (energy - 6900) + 0.3 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> bool(edge_contrast(energy, mu, np.array([7112.0]))[0] > 10)
    True
    """
    energy, mu = batch_rows(energy, mu)
    # One grid for the batch, where all its spectra are.
    step = SLOPE_EV / SLOPE_PHASES
    grid = np.arange(float(energy[:, 0].max()), float(energy[:, -1].min()), step)
    if grid.size < 2 * SLOPE_PHASES + 1:
        return np.full(mu.shape[0], np.inf)
    e0 = np.broadcast_to(np.asarray(e0, dtype=np.float64).reshape(-1), (mu.shape[0],))
    contrast = np.empty(mu.shape[0])
    for rows in row_blocks(mu.shape[0]):
        contrast[rows] = _contrast(grid, energy[rows], mu[rows], e0[rows])
    return contrast


#: A spectrum the slopes refuse still has an edge where mu(E) rises across E0 this many
#: times more than across any point 30 eV or more from it (:func:`rise_contrast`).
MIN_RISE_CONTRAST = 3.5
#: ... judged against at least this many points (1 eV apart) 30 eV or more from E0.
MIN_RISES_AWAY = 60


def rise_contrast(energy: np.ndarray, mu: np.ndarray, e0: np.ndarray) -> np.ndarray:
    """How much more mu(E) rises across E0 than across any point 30 eV or more away.

    A rise is :func:`edge_rise`'s (the median over 5-20 eV above a point less the median
    over 20-5 eV below), on a 1 eV grid, against the spectrum's trend (the median rise).
    Medians over 15 eV pass over what is narrow (a glitch, a diffraction peak in a
    fluorescence channel) and see what is wide: an L edge of a heavy element, ~10 eV wide,
    that :func:`edge_contrast`'s 2.5 eV slopes find no steeper than such a peak (APS 20-ID's
    Pb L3 beside a diffraction peak: slopes 1.1, rises 4.1). Measured: 3.1 to 17.9 on the
    test data's and three more real spectra across their edge; at most 2.9 for them cut 30
    to 150 eV above it; white noise at most 1.2 (99th percentile of 2,000), a random walk
    1.7. 0 where fewer than ``MIN_RISES_AWAY`` points are 30 eV away (noise on a 120 eV
    scan passed 0.85% of the time with 40).

    Examples
    --------
    >>> energy = np.linspace(12900.0, 13300.0, 401)
    >>> mu = 1.0 / (1 + np.exp(-(energy - 13035.0) / 4))
    >>> bool(rise_contrast(energy, mu, np.array([13035.0]))[0] > 10)
    True
    """
    energy, mu = batch_rows(energy, mu)
    grid = np.arange(float(energy[:, 0].max()), float(energy[:, -1].min()), 1.0)
    width, gap = 16, 5  # points of a 15 eV window, and its gap (eV) from the point
    centres = np.arange(gap + width - 1, grid.size - gap - width + 1)
    e0 = np.broadcast_to(np.asarray(e0, dtype=np.float64).reshape(-1), (mu.shape[0],))
    contrast = np.zeros(mu.shape[0])
    if centres.size == 0:
        return contrast
    distance = np.abs(grid[centres][None, :] - e0[:, None])
    for rows in row_blocks(mu.shape[0], 256):
        on_grid = np.stack(
            [np.interp(grid, e, m) for e, m in zip(energy[rows], mu[rows], strict=True)]
        )
        window = np.median(np.lib.stride_tricks.sliding_window_view(on_grid, width, axis=1), -1)
        rise = window[:, centres + gap] - window[:, centres - gap - width + 1]
        rise = rise - np.median(rise, axis=1, keepdims=True)
        near = np.where(distance[rows] <= 5.0, rise, 0.0).max(axis=1)  # up: an edge rises
        away = distance[rows] >= 30.0
        far = np.where(away, np.abs(rise), 0.0).max(axis=1)
        # A few points away judge nothing (noise on an 80 eV scan passed 3% of the time).
        judged = (far > 0) & (away.sum(axis=1) >= MIN_RISES_AWAY)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrast[rows] = np.where(judged, near / far, 0.0)
    return contrast


def has_edge(
    energy: np.ndarray, mu: np.ndarray, e0: np.ndarray, contrast: np.ndarray | None = None
) -> np.ndarray:
    """The spectra with an absorption edge at ``e0``: steeper there than 30 eV away
    (:func:`edge_contrast` at least ``MIN_EDGE_CONTRAST``), or, where not, rising across
    it more than anywhere 30 eV away (:func:`rise_contrast` at least ``MIN_RISE_CONTRAST``);
    and, where the slopes have little or nothing to judge by (:func:`slopes_cannot_judge`:
    a short XANES scan), rising across it ``MIN_EDGE_NOISE_RATIO`` times its noise
    (:func:`edge_rise`). ``contrast``: the edge contrast, when already measured."""
    energy, mu = batch_rows(energy, mu)
    contrast = edge_contrast(energy, mu, e0) if contrast is None else np.asarray(contrast)
    e0 = np.broadcast_to(np.asarray(e0, dtype=np.float64).reshape(-1), (mu.shape[0],))
    passed = contrast >= MIN_EDGE_CONTRAST
    if not passed.all():
        refused = np.flatnonzero(~passed)
        rises = rise_contrast(energy[refused], mu[refused], e0[refused])
        passed[refused] = rises >= MIN_RISE_CONTRAST
    unjudged = np.flatnonzero(passed & slopes_cannot_judge(energy, e0, contrast))
    if unjudged.size:  # white noise on such a scan rises at most ~2 times its noise
        e, m = energy[unjudged], mu[unjudged]
        rise = edge_noise_ratio(e, m, edge_rise(e, m, e0[unjudged]))
        passed[unjudged] = rise >= MIN_EDGE_NOISE_RATIO
    return passed


def _without_glitches(mu: np.ndarray) -> np.ndarray:
    """Rows of ``mu`` with their glitches taken out: a point further than ``GLITCH_NOISE``
    times the row's noise from the median of itself and its neighbours is that median.

    The noise is the robust spread of second differences (as :func:`edge_noise_ratio`'s),
    so noise itself is left as it is (a median of three everywhere smoothed white noise
    and let 8 spectra of pure noise in 20,000 pass :func:`edge_contrast`, 0 before); a
    monotonic rise (an edge) is its own median."""
    left, centre, right = mu[:, :-2], mu[:, 1:-1], mu[:, 2:]
    median = np.maximum(np.minimum(left, centre), np.minimum(np.maximum(left, centre), right))
    # Every other second difference: the spread is as robust and costs a quarter.
    second = right[:, ::2] - 2 * centre[:, ::2] + left[:, ::2]
    noise = 1.4826 * np.median(np.abs(second), axis=1)[:, None] / np.sqrt(6.0)
    glitch = np.abs(centre - median) > GLITCH_NOISE * noise
    if not glitch.any():
        return mu
    cleaned = mu.copy()
    cleaned[:, 1:-1] = np.where(glitch, median, centre)
    return cleaned


def _contrast(grid: np.ndarray, energy: np.ndarray, mu: np.ndarray, e0: np.ndarray) -> np.ndarray:
    """:func:`edge_contrast` of rows, their secants over ``SLOPE_EV`` on ``grid``."""
    # A monochromator glitch no longer passes for the steepest slope far from the edge.
    mu = _without_glitches(mu)
    on_grid = np.stack([np.interp(grid, e, m) for e, m in zip(energy, mu, strict=True)])
    k = SLOPE_PHASES
    slope = (on_grid[:, k:] - on_grid[:, :-k]) / SLOPE_EV
    slope = np.abs(slope - np.median(slope, axis=1, keepdims=True))
    distance = np.abs(0.5 * (grid[k:] + grid[:-k]) - e0.reshape(-1, 1))
    ends = np.zeros(slope.shape[1], dtype=bool)  # glitches at the scan's ends do not count
    skip = max(2 * k, int(0.03 * slope.shape[1]))
    ends[:skip] = ends[-skip:] = True
    near = np.where(distance <= 5.0, slope, 0.0).max(axis=1)
    far = np.where((distance >= 30.0) & ~ends, slope, 0.0).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(far > 0, near / far, np.inf)


def step_to_range(mu: np.ndarray, edge_step: np.ndarray) -> np.ndarray:
    """Each spectrum's edge step over the range of its mu(E) (1st to 99th percentile).

    A real edge's step is at most about the spectrum's range (a white line, a sloping
    background make the range larger); above ``MAX_STEP_TO_RANGE``, the step is an
    extrapolation of lines fitted to noise.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7400.0, 251)
    >>> mu = 0.2 + 1.0 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> float(step_to_range(mu[None, :], np.array([1.0]))[0]).__round__(2)
    1.0
    """
    low, high = np.percentile(np.atleast_2d(mu), [1.0, 99.0], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(edge_step) / (high - low)


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


def e0_undecided(edge_noise: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The spectra whose E0 the data do not decide: an edge step under
    ``MIN_EDGE_NOISE_RATIO`` times the noise, or E0 moving over ``MAX_E0_SPREAD`` eV
    between the even and the odd points (:func:`edge_noise_ratio`, :func:`e0_spread`).

    Examples
    --------
    >>> e0_undecided(np.array([58.0, 1639.0, 4.0]), np.array([11.7, 0.05, 0.1])).tolist()
    [True, False, True]
    """
    return (np.asarray(edge_noise) < MIN_EDGE_NOISE_RATIO) | (np.asarray(spread) > MAX_E0_SPREAD)


#: A scan within this many eV of E0 on both sides gives the edge test few slopes 30 eV
#: away, or none: its edge is judged by its rise over the noise too (:func:`edge_rise`).
SHORT_SCAN_EV = 40.0


def slopes_cannot_judge(energy: np.ndarray, e0: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """The spectra whose :func:`edge_contrast` says little: no slope 30 eV from E0 (inf),
    or a scan within ``SHORT_SCAN_EV`` of E0 on both sides (white noise on a 40 eV scan
    with E0 found near one end passed the edge test with the few slopes at the other)."""
    energy = np.atleast_2d(energy)
    e0 = np.reshape(e0, -1)
    short = (e0 - energy[:, 0] < SHORT_SCAN_EV) & (energy[:, -1] - e0 < SHORT_SCAN_EV)
    return np.isinf(contrast) | short


def edge_rise(energy: np.ndarray, mu: np.ndarray, e0: np.ndarray) -> np.ndarray:
    """How much mu(E) rises across E0: its median from 5 to 20 eV above E0 less its median
    from 20 to 5 eV below (0 where a side has no point). Needs no fit: a figure for the
    spectra the edge test cannot judge (a scan with no point 30 eV from E0), in units of
    the noise (:func:`edge_noise_ratio`): on such a 40 eV scan, the real spectra of the
    test data rise 264 to 3,900 times their noise, white noise at most 2.2 (2,000 tries).

    Examples
    --------
    >>> energy = np.linspace(7100.0, 7140.0, 81)
    >>> mu = 0.2 + 1.0 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> float(edge_rise(energy, mu, np.array([7112.0]))[0]).__round__(2)
    0.98
    """
    energy, mu = batch_rows(energy, mu)
    offset = np.broadcast_to(energy, mu.shape) - np.reshape(e0, (-1, 1))
    above = np.where((offset >= 5.0) & (offset <= 20.0), mu, np.nan)
    below = np.where((offset >= -20.0) & (offset <= -5.0), mu, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a side without points: NaN
        rise = np.nanmedian(above, axis=1) - np.nanmedian(below, axis=1)
    return np.nan_to_num(rise, nan=0.0)


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
