"""Merging repeated scans: weighted averages on a common grid, and the noise that weighs them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MergedSpectrum:
    energy: np.ndarray
    values: np.ndarray
    error: np.ndarray  # weighted standard error of the mean, point by point
    weights: np.ndarray  # (count,) normalised to sum 1
    count: int


def merge_spectra(
    energies: list[np.ndarray], values: list[np.ndarray], noise: np.ndarray | None = None
) -> MergedSpectrum:
    """Average spectra on the first one's energy grid, where all overlap.

    With ``noise`` (one estimate per spectrum, e.g. :func:`noise_level`), each
    spectrum is weighted by 1/noise², so a noisy repeat cannot make the merge
    noisier than the good ones; without it the weights are equal.
    """
    if not values:
        raise ValueError("nothing to merge")
    low = max(float(e[0]) for e in energies)
    high = min(float(e[-1]) for e in energies)
    grid = energies[0][(energies[0] >= low) & (energies[0] <= high)]
    stack = np.stack([np.interp(grid, e, v) for e, v in zip(energies, values, strict=True)])
    count = stack.shape[0]
    if noise is None:
        weights = np.ones(count)
    else:
        weights = 1.0 / np.maximum(np.asarray(noise, dtype=np.float64), 1e-12) ** 2
    weights = weights / weights.sum()
    mean = weights @ stack
    if count > 1:
        spread = weights @ (stack - mean) ** 2
        error = np.sqrt(spread / (count - 1))
    else:
        error = np.zeros(grid.size)
    return MergedSpectrum(energy=grid, values=mean, error=error, weights=weights, count=count)


def spectrum_noise(energy: np.ndarray, values: np.ndarray, e0: float) -> float:
    """Noise of a normalised spectrum above the edge (from E0 + 50 eV to the end)."""
    return noise_level(energy, values, e0 + 50.0, float(energy[-1]))


def noise_level(energy: np.ndarray, values: np.ndarray, start: float, stop: float) -> float:
    """Point-to-point noise of ``values`` between energies ``start`` and ``stop``.

    The standard deviation of second differences divided by sqrt(6): for white
    noise that is the noise of one point, and a smooth signal hardly contributes.
    """
    inside = (energy >= start) & (energy <= stop)
    second = np.diff(values[inside], 2)
    return float(np.std(second) / np.sqrt(6.0))
