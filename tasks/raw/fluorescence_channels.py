"""A scan's fluorescence channels, found by their names when nobody named them.

'auto' mode makes mu(E) in transmission. A dilute sample's edge shows only in its
fluorescence, which beamlines record as the sums of a detector's regions of interest,
named for the element and its line (``Sum_Fe_Ka``, ``Fe_Ka_mca1`` ... ``Fe_Ka_mca7``,
``xmap4_mnka_sum``), or as a fluorescence ion chamber (``iff``, ``ifluor``, ``pips``).
Where transmission shows no edge, the planner tries these (:func:`fluorescence_candidates`)
as Athena's user would: a line's channels only when its element's edge lies inside the
scanned energies; a line's sum where the file has one, else its channels summed (the
dead-time corrected ones where there are both); and keeps the first whose mu(E) has an
edge.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np

from calypso.tasks.raw.spectra import ColumnTable, numbered

#: A fluorescence ion chamber, diode or detector element, by its usual names; numbered
#: ones ('Ifch1' ... 'Ifch4', NSLS X23A2's Vortex) are summed.
CHAMBER_NAMES = (
    "iff", "if", "ifluor", "ifluo", "ifl", "ifch", "fluo", "fluor", "fl", "lytle", "pips"
)  # fmt: skip
#: Emission lines as ROIs are named, and the edge that excites each.
LINE_EDGES = {"k": ("K",), "l": ("L3", "L2", "L1"), "m": ("M5", "M4")}
_LINE = re.compile(r"^(k|l|m)(?:a|b|alpha|beta)\d?$")
_ELEMENT_AND_LINE = re.compile(r"^([a-z]{1,2})((?:k|l|m)(?:a|b|alpha|beta)\d?)$")
_SUMS = frozenset({"sum", "total", "tot"})
_CORRECTED = frozenset({"corr", "corrected", "dtc", "dtcorr"})


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z]+", name.lower()))


@cache
def _symbols() -> frozenset[str]:
    import xraydb

    return frozenset(xraydb.atomic_symbol(z).lower() for z in range(3, 99))


def _element_line(name: str) -> tuple[str, str] | None:
    """(element, line family) a column's name gives: 'Sum_Fe_Ka' -> ('Fe', 'k')."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    for i, token in enumerate(tokens):
        joined = _ELEMENT_AND_LINE.match(token)
        if joined and joined.group(1) in _symbols():
            return joined.group(1).capitalize(), joined.group(2)[0]
        if i + 1 < len(tokens) and token in _symbols() and _LINE.match(tokens[i + 1]):
            return token.capitalize(), tokens[i + 1][0]
    return None


def _edge_inside(element: str, family: str, low: float, high: float) -> bool:
    import xraydb

    edges = xraydb.xray_edges(element)
    return any(low < edges[e].energy < high for e in LINE_EDGES[family] if e in edges)


def fluorescence_candidates(table: ColumnTable, energy: np.ndarray) -> list[list[str]]:
    """The channel sets that may hold the sample's fluorescence, most likely first: each
    element line whose edge lies inside ``energy``'s range (its sum column, else all its
    channels), then a fluorescence chamber."""
    low, high = float(np.nanmin(energy)), float(np.nanmax(energy))
    lines: dict[tuple[str, str], list[str]] = {}
    for name in table.columns:
        found = _element_line(name)
        if found is not None:
            lines.setdefault(found, []).append(name)
    candidates = []
    for (element, family), names in lines.items():
        if not _edge_inside(element, family, low, high):
            continue
        sums = [n for n in names if _words(n) & _SUMS]
        # Without a sum, each detector element's channel once: its dead-time corrected
        # one where the file has both (SLS: 'D1_AlKa_corr' beside 'D1_AlKa').
        corrected = [n for n in names if _words(n) & _CORRECTED]
        candidates.append(sums[:1] or corrected or names)
    for chamber in CHAMBER_NAMES:
        found = [name for name in table.columns if numbered(name.lower(), chamber, bare=True)]
        if found:
            candidates.append(found)
    return [c for c in candidates if not any(_counts_points(table.columns[n]) for n in c)]


def _counts_points(values: np.ndarray) -> bool:
    """Whether a column only ever rises (or only falls): an index, a clock or an axis that
    a header's names misplaced (ESRF BM29's 'fluo' label lands on its point counter), not
    a detector's counts, whose noise goes both ways."""
    row = np.asarray(values, dtype=np.float64)
    row = row[0] if row.ndim == 2 else row
    steps = np.diff(row[np.isfinite(row)])
    return steps.size > 0 and (bool(np.all(steps > 0)) or bool(np.all(steps < 0)))
