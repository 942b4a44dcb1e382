"""mu(E) from the raw counters: transmission, fluorescence, monochromator energy; sanity checks.

Arrays of a batch are rows: ``mu`` has shape ``(n_spectra, n_points)`` and
``energy`` either the same shape or ``(n_points,)`` when the spectra share one
grid; :func:`batch_rows` brings both to rows of float64.
"""

from __future__ import annotations

import numpy as np
from scipy import constants

from calypso.errors import RawDataError

#: Spectra worked on at once where a batch's temporaries would grow with the batch
#: (:func:`row_blocks`): ~64 kB of arrays each, ~33 MB a block.
BLOCK_ROWS = 512


def batch_rows(energy: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``energy`` and ``mu`` as float64 rows ``(n, m)``, a shared energy grid broadcast.

    Examples
    --------
    >>> energy, mu = batch_rows(np.arange(4.0), np.ones(4))
    >>> energy.shape, mu.shape
    ((1, 4), (1, 4))
    """
    mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
    energy = np.broadcast_to(np.asarray(energy, dtype=np.float64), mu.shape)
    return energy, mu


def row_blocks(n: int, rows: int = BLOCK_ROWS) -> list[slice]:
    """Slices of ``rows`` spectra (the last one shorter) covering ``n``.

    The per-spectrum arithmetic of this package gives the same numbers whatever rows
    it is done with (interpolation, smoothing, medians, FFTs and stacked solves are row by
    row), so a batch may be worked on a block at a time; matrix products over the batch
    (BLAS) are not, and are done on the whole batch.

    Examples
    --------
    >>> row_blocks(5, rows=2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    return [slice(start, min(start + rows, n)) for start in range(0, n, max(rows, 1))]


def mono_energy(angle_deg: np.ndarray, d_spacing: float) -> np.ndarray:
    """Photon energy (eV) selected by a crystal monochromator at Bragg angle ``angle_deg``.

    ``d_spacing`` is the crystal's lattice spacing in Å.

    Examples
    --------
    >>> round(float(mono_energy(np.array(16.0), 3.1356)), 1)  # Si(111)
    7172.6
    """
    wavelength = 2 * d_spacing * np.sin(np.radians(angle_deg))  # Å
    return constants.h * constants.c / constants.e / (wavelength * 1e-10)


def transmission_mu(i0: np.ndarray, it: np.ndarray) -> np.ndarray:
    """mu(E)·t = ln(I0 / It).

    Examples
    --------
    >>> transmission_mu(np.array([100.0]), np.array([10.0]))
    array([2.30258509])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(i0, dtype=np.float64) / np.asarray(it, dtype=np.float64))


def fluorescence_mu(
    channels: list[np.ndarray],
    i0: np.ndarray,
    icr: list[np.ndarray] | None = None,
    ocr: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Sum of the fluorescence channels over I0, each channel dead-time corrected by ICR/OCR.

    Examples
    --------
    >>> fluorescence_mu([np.array([10.0]), np.array([20.0])], np.array([100.0]))
    array([0.3])
    """
    total = np.zeros_like(np.asarray(i0, dtype=np.float64))
    for index, channel in enumerate(channels):
        signal = np.asarray(channel, dtype=np.float64)
        if icr and ocr:
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = np.asarray(icr[index], np.float64) / np.asarray(ocr[index], np.float64)
            signal = signal * np.where(np.isfinite(factor), factor, 1.0)
        total += signal
    with np.errstate(divide="ignore", invalid="ignore"):
        return total / np.asarray(i0, dtype=np.float64)


def check_spectrum(energy: np.ndarray, mu: np.ndarray, where: str) -> None:
    """Refuse what cannot be a spectrum: a non-increasing energy or a mu that is not finite.

    Raises
    ------
    RawDataError
        Saying ``where`` and what is wrong.

    Examples
    --------
    >>> check_spectrum(np.arange(20.0), np.ones(20), "scan 1")
    >>> check_spectrum(np.arange(20.0)[::-1], np.ones(20), "scan 1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    calypso.errors.RawDataError: scan 1: the energy is not strictly increasing ...
    """
    energy = np.atleast_2d(energy)
    steps = np.diff(energy, axis=-1)
    if energy.shape[-1] < 10:
        raise RawDataError(f"{where}: only {energy.shape[-1]} energy points; a spectrum needs more")
    if not np.all(np.isfinite(energy)):  # a NaN passes the monotonic test below
        raise RawDataError(
            f"{where}: the energy is NaN or infinite at {int((~np.isfinite(energy)).sum())} "
            "points; a spectrum's axis must be finite everywhere"
        )
    if np.any(steps <= 0):
        row, column = np.argwhere(steps <= 0)[0]
        raise RawDataError(
            f"{where}: the energy is not strictly increasing (point {column + 1}: "
            f"{energy[row, column]:.3f} -> {energy[row, column + 1]:.3f} eV); give the energy "
            "column of a monotonic scan or sort the file"
        )
    bad = ~np.isfinite(mu)
    if np.any(bad):
        fraction = bad.mean()
        raise RawDataError(
            f"{where}: mu(E) is not finite at {bad.sum()} points ({fraction:.0%}): "
            "I0 or It is zero or negative there (beam lost? wrong counter? a sample so thick "
            "that no beam gets through?)"
        )
