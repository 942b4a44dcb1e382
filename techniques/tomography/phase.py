"""Single-material phase retrieval (Paganin et al. 2002) and the reach of its kernel.

Energies in keV, lengths in the unit each name says (``distance_m``,
``pixel_size_um``); ``delta_beta`` is the material's delta/beta.
"""

from __future__ import annotations

import math

import numpy as np

PLANCK_EV_M = 1.239841984e-6  # h*c in eV*m: wavelength = PLANCK_EV_M / energy_eV


def paganin_length_px(
    energy_kev: float, distance_m: float, pixel_size_um: float, delta_beta: float
) -> float:
    """Width of the Paganin low-pass kernel (its exponential decay length), in pixels."""
    wavelength = PLANCK_EV_M / (energy_kev * 1e3)
    alpha = math.pi * wavelength * distance_m * delta_beta  # m^2
    return math.sqrt(alpha) / (2 * math.pi) / (pixel_size_um * 1e-6)


def paganin_margin(
    *, energy_kev: float, distance_m: float, pixel_size_um: float, delta_beta: float
) -> int:
    """Extra detector rows to read either side of a slab so Paganin sees the neighbourhood.

    Examples
    --------
    >>> paganin_margin(energy_kev=20, distance_m=0.5, pixel_size_um=1.0, delta_beta=200)
    178
    """
    length = paganin_length_px(energy_kev, distance_m, pixel_size_um, delta_beta)
    return max(1, math.ceil(8 * length))  # exp(-8): the kernel has decayed to 3e-4


def paganin_filter(
    transmission: np.ndarray,
    energy_kev: float,
    distance_m: float,
    pixel_size_um: float,
    delta_beta: float,
) -> np.ndarray:
    """Single-material phase retrieval (Paganin et al. 2002) of each projection.

    Divides the Fourier transform of the transmission by
    ``1 + pi * wavelength * distance * delta/beta * |u|^2`` (``u`` in cycles/m);
    the result is again a transmission, to take ``-log`` of.

    Parameters
    ----------
    transmission : ndarray, shape (n, rows, columns)
        Flat-field corrected projections.
    """
    wavelength = PLANCK_EV_M / (energy_kev * 1e3)
    alpha = math.pi * wavelength * distance_m * delta_beta
    n, rows, columns = transmission.shape
    # Edge padding, wide enough that the periodic FFT does not bring the far edge
    # within reach of the kernel (16 decay lengths: a wrap-around below 1e-7).
    reach = math.ceil(16 * paganin_length_px(energy_kev, distance_m, pixel_size_um, delta_beta))
    pad_rows, pad_columns = max(rows // 2, reach), max(columns // 2, reach)
    padded = np.pad(
        transmission, ((0, 0), (pad_rows, pad_rows), (pad_columns, pad_columns)), mode="edge"
    )
    pixel = pixel_size_um * 1e-6
    u = np.fft.fftfreq(padded.shape[1], d=pixel)
    v = np.fft.rfftfreq(padded.shape[2], d=pixel)
    denominator = (1 + alpha * (u[:, None] ** 2 + v[None, :] ** 2)).astype(np.float32)
    out = np.empty_like(transmission, dtype=np.float32)
    for index in range(n):
        spectrum = np.fft.rfft2(padded[index]) / denominator
        filtered = np.fft.irfft2(spectrum, s=padded.shape[1:])
        out[index] = filtered[pad_rows : pad_rows + rows, pad_columns : pad_columns + columns]
    return out
