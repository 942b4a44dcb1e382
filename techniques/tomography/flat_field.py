"""Dark/flat-field correction, with flats interpolated in time, and minus log.

Arrays are ``projections[angle, row, column]``; the result of both steps is
float32.
"""

from __future__ import annotations

import numpy as np

# Transmission below this is noise or a dead pixel; -log of it would be huge.
DEFAULT_LOG_FLOOR = 1e-4


def flat_weights(
    positions: np.ndarray, flat_positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation between the flat series around each projection.

    Parameters
    ----------
    positions : ndarray, shape (n,)
        When each projection was taken (frame counter, time: any increasing scale).
    flat_positions : ndarray, shape (g,)
        When each flat series was taken, on the same scale.

    Returns
    -------
    below, above : ndarray of int, shape (n,)
        Index of the flat series before and after each projection (the same
        one outside the range of the series).
    weight : ndarray, shape (n,)
        Weight of ``above`` (``1 - weight`` goes to ``below``).
    """
    positions = np.asarray(positions, dtype=np.float64)
    order = np.argsort(flat_positions)
    sorted_positions = np.asarray(flat_positions, dtype=np.float64)[order]
    upper = np.clip(np.searchsorted(sorted_positions, positions), 1, len(order) - 1)
    if len(order) == 1:
        zeros = np.zeros(len(positions), dtype=int)
        return order[zeros], order[zeros], np.zeros(len(positions))
    lower = upper - 1
    span = sorted_positions[upper] - sorted_positions[lower]
    weight = np.clip((positions - sorted_positions[lower]) / np.where(span > 0, span, 1), 0, 1)
    return order[lower], order[upper], weight


def flat_field_correction(
    projections: np.ndarray,
    dark: np.ndarray,
    flats: np.ndarray,
    positions: np.ndarray | None = None,
    flat_positions: np.ndarray | None = None,
) -> np.ndarray:
    """Transmission ``(P - D) / (F - D)`` with the flat interpolated in time.

    Parameters
    ----------
    projections : ndarray, shape (n, rows, columns)
    dark : ndarray, shape (rows, columns)
        Mean dark image.
    flats : ndarray, shape (g, rows, columns)
        Mean image of each flat series (before, after, or every N projections).
    positions, flat_positions : ndarray, optional
        Acquisition order of projections and flat series (see
        :func:`flat_weights`); without them the flats are averaged.

    Returns
    -------
    ndarray of float32, shape (n, rows, columns)
        Transmission; pixels whose flat is not above the dark get 1.
    """
    dark = np.asarray(dark, dtype=np.float32)
    flats = np.asarray(flats, dtype=np.float32).reshape(-1, *dark.shape) - dark
    signal = np.asarray(projections, dtype=np.float32) - dark
    if positions is None or flat_positions is None or len(flats) == 1:
        beam = flats.mean(axis=0)
        valid = beam > 0
        return np.where(valid, signal / np.where(valid, beam, 1), np.float32(1))
    below, above, weight = flat_weights(positions, flat_positions)
    weight = weight.astype(np.float32)[:, None, None]
    beam = flats[below] * (1 - weight) + flats[above] * weight
    valid = beam > 0
    np.divide(signal, beam, out=signal, where=valid)
    signal[~valid] = 1
    return signal


def minus_log(transmission: np.ndarray, floor: float = DEFAULT_LOG_FLOOR) -> np.ndarray:
    """``-log(max(T, floor))``: line integrals of the attenuation coefficient."""
    values = np.maximum(transmission, np.float32(floor))
    return np.negative(np.log(values, out=values), out=values)
