"""From raw projections to sinograms of line integrals, and binned copies of them for previews."""

from __future__ import annotations

import numpy as np

from calypso.techniques.tomography.flat_field import DEFAULT_LOG_FLOOR, flat_field_correction

# The keyword ``minus_log`` (the parameter's name) hides the function of that name.
from calypso.techniques.tomography.flat_field import minus_log as take_minus_log
from calypso.techniques.tomography.phase import paganin_filter
from calypso.techniques.tomography.rings import remove_rings, ring_filter_size


def prepare_sinograms(
    projections: np.ndarray,
    dark: np.ndarray | None,
    flats: np.ndarray | None,
    positions: np.ndarray | None = None,
    flat_positions: np.ndarray | None = None,
    *,
    flat_field: bool = True,
    paganin: bool = False,
    energy_kev: float | None = None,
    distance_m: float | None = None,
    pixel_size_um: float | None = None,
    delta_beta: float = 100.0,
    minus_log: bool = True,
    log_floor: float = DEFAULT_LOG_FLOOR,
    ring_removal: bool = True,
    ring_size: int | None = None,
) -> np.ndarray:
    """Flat field, Paganin, -log and ring removal, each when asked, in that order.

    Parameters
    ----------
    projections : ndarray, shape (angles, rows, columns)
        Raw projections.
    dark : ndarray, shape (rows, columns), optional
        Mean dark image (default: zero).
    flats : ndarray, shape (g, rows, columns), optional
        Mean image of each flat series; needed by ``flat_field``.
    positions, flat_positions : ndarray, optional
        Acquisition order of projections and flat series (see
        :func:`~calypso.techniques.tomography.flat_field.flat_weights`).
    flat_field : bool
        Divide by the flats after subtracting the dark.
    paganin : bool
        Single-material phase retrieval; needs ``energy_kev``, ``distance_m``
        (sample-detector) and ``pixel_size_um``, with ``delta_beta``.
    minus_log : bool
        Take ``-log`` of the transmission, floored at ``log_floor``.
    ring_removal : bool
        Remove stripes with a filter ``ring_size`` pixels wide (default: 1% of the width).

    Returns
    -------
    ndarray of float32, shape (angles, rows, columns)
        Sinograms of line integrals.

    Examples
    --------
    >>> projections = np.full((4, 2, 8), 50.0)
    >>> flats = np.full((1, 2, 8), 100.0)
    >>> sinograms = prepare_sinograms(projections, None, flats, ring_removal=False)
    >>> sinograms.dtype, float(sinograms[0, 0, 0]).__round__(4)  # -log(0.5)
    (dtype('float32'), 0.6931)
    """
    if flat_field:
        if flats is None:
            raise ValueError("flat-field correction needs flats")
        dark = np.zeros(flats.shape[-2:], np.float32) if dark is None else dark
        data = flat_field_correction(projections, dark, flats, positions, flat_positions)
    else:
        data = np.asarray(projections, dtype=np.float32)
    if paganin:
        if energy_kev is None or distance_m is None or pixel_size_um is None:
            raise ValueError("paganin needs energy_kev, distance_m and pixel_size_um")
        data = paganin_filter(data, energy_kev, distance_m, pixel_size_um, delta_beta)
    if minus_log:
        data = take_minus_log(data, log_floor)
    if ring_removal:
        data = remove_rings(data, ring_filter_size(data.shape[-1], ring_size))
    return data


def bin_sinograms(
    sinograms: np.ndarray, angles: np.ndarray, center: float, factor: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Average ``factor`` adjacent columns and keep every ``factor``-th angle.

    Returns the binned sinograms, their angles and the axis in binned columns.
    A reconstruction of them is in 1/(binned pixel): divide it by ``factor``.
    """
    if factor == 1:
        return sinograms, angles, center
    _, rows, width = sinograms.shape
    kept = sinograms[::factor, :, : width // factor * factor]
    binned = kept.reshape(kept.shape[0], rows, -1, factor).mean(axis=3)
    return binned, angles[::factor], (center - (factor - 1) / 2) / factor
