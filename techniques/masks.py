"""How much of the detector a mask leaves: too little, and the results are empty, not wrong.

A mask that masks every pixel gives every radial bin 0 (and every MX image 0 spots) with
no error anywhere. Nearly as common is a mask of the other convention (non-zero = *valid*
instead of masked), which leaves only the module gaps: 7 to 9 % of a Pilatus or Eiger.
The default threshold, 10 % of the pixels, refuses both, while the masks used in
practice (gaps, beam stop and its arm, shadows, hot pixels: rarely over half of the
detector) pass. An analysis of a narrow sector can lower it (``min_unmasked_fraction``).
"""

from __future__ import annotations

import numpy as np

#: The default of ``min_unmasked_fraction``: see the module's docstring.
DEFAULT_MIN_UNMASKED_FRACTION = 0.1


def unmasked_fraction(masked: np.ndarray) -> float:
    """The fraction of pixels a mask leaves (non-zero = masked).

    Examples
    --------
    >>> unmasked_fraction(np.array([[0, 1], [1, 1]]))
    0.25
    """
    masked = np.asarray(masked)
    return float(np.count_nonzero(masked == 0) / max(masked.size, 1))


def check_unmasked(masked: np.ndarray, min_fraction: float = DEFAULT_MIN_UNMASKED_FRACTION) -> None:
    """Refuse a mask that leaves fewer than ``min_fraction`` of the pixels.

    Parameters
    ----------
    masked : ndarray
        Non-zero where a pixel is masked.
    min_fraction : float
        0 to 1; 0 accepts any mask (even one masking every pixel).

    Raises
    ------
    ValueError
        Saying how many pixels are left; the caller names the mask's file.

    Examples
    --------
    >>> check_unmasked(np.zeros((4, 4)), 0.1)
    >>> check_unmasked(np.ones((4, 4)), 0.1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: it leaves 0 of 16 pixels (0.0%) unmasked, fewer than min_unmasked_fraction=0.1 ...
    """
    masked = np.asarray(masked)
    left = int(np.count_nonzero(masked == 0))
    fraction = left / max(masked.size, 1)
    if fraction < min_fraction:
        raise ValueError(
            f"it leaves {left} of {masked.size} pixels ({fraction:.1%}) unmasked, fewer than "
            f"min_unmasked_fraction={min_fraction:g} (is it inverted? non-zero = masked)"
        )
