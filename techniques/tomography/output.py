"""The reconstructed volume as written: value range and data type."""

from __future__ import annotations

import numpy as np


def auto_range(slices: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """A display/output range: the ``low``-``high`` percentiles of the non-zero voxels."""
    values = slices[slices != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def rescale(
    volume: np.ndarray, output_range: tuple[float, float] | None, dtype: str = "float32"
) -> np.ndarray:
    """Clip to ``output_range`` and, for integer types, map it onto the full integer range."""
    if output_range is None and dtype == "float32":
        return volume.astype(np.float32, copy=False)
    if output_range is None:
        raise ValueError(f"output type {dtype} needs an output range")
    lo, hi = output_range
    clipped = np.clip(volume, lo, hi)
    if dtype == "float32":
        return clipped.astype(np.float32, copy=False)
    top = np.iinfo(dtype).max
    return np.rint((clipped - lo) * (top / (hi - lo))).astype(dtype)
