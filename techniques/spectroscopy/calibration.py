"""Energy calibration: tabulated edges (xraydb), the shift putting a reference foil's E0 on them."""

from __future__ import annotations

import numpy as np

from calypso.errors import ParameterError
from calypso.techniques.spectroscopy.edge import find_e0


def tabulated_edge(element: str, edge: str = "K") -> float:
    """Tabulated edge energy (eV) from xraydb.

    Examples
    --------
    >>> tabulated_edge("Fe", "K")
    7112.0
    """
    import xraydb

    try:
        return float(xraydb.xray_edge(element, edge).energy)
    except Exception:
        raise ParameterError(
            f"no tabulated {edge} edge for element {element!r}: give element as a chemical "
            "symbol (e.g. Fe) and edge as K, L1, L2, L3 ..."
        ) from None


def guess_edge(e0: float) -> tuple[str, str]:
    """The element and edge whose tabulated energy is nearest ``e0`` (eV; xraydb).

    Examples
    --------
    >>> guess_edge(8980.0)
    ('Cu', 'K')
    """
    import xraydb

    element, edge = xraydb.guess_edge(float(e0))
    return str(element), str(edge)


def calibration_shift(
    energy: np.ndarray, mu_reference: np.ndarray, reference_e0: float, smooth: float = 0.5
) -> np.ndarray:
    """Energy shift (eV) that puts each reference spectrum's E0 on ``reference_e0``."""
    return reference_e0 - find_e0(energy, mu_reference, smooth)
