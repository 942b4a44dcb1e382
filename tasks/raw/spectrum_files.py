"""Text and project files of XAS spectra, in the layouts beamlines write, read with Larch.

XDI files are read here (fast, no Larch). Every other column file (SPEC ``#S/#L``,
EPICS scans with ``;`` comments, MRCAT, LabVIEW, KEK-PF, SSRL, XDAC, CLS, comma
separated ...) is read by ``larch.io.read_ascii``, the reader Athena's users rely
on, and Athena projects (``.prj``, one spectrum a group) by ``larch.io.read_athena``.
Larch is imported only here, when such a file is read: it costs seconds to import.

The energy column is found by name, else by what it holds (:func:`energy_by_content`):
a monotonic column in eV or keV, or a monochromator angle with the d-spacing of the
file's header.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from calypso.errors import RawDataError
from calypso.executors.worker_setup import scratch_folder
from calypso.techniques.spectroscopy import mono_energy

#: Plausible X-ray absorption edge energies (eV) of a scan.
ENERGY_RANGE_EV = (100.0, 200_000.0)
#: Plausible monochromator Bragg angles (degrees).
ANGLE_RANGE_DEG = (2.0, 85.0)
#: Smallest span (eV) of a scan across an edge.
MIN_SPAN_EV = 20.0
#: A spectrum's energy read back from the monochromator may step back at a few points (at
#: most ``MAX_JITTER`` of them) by up to ``JITTER_STEP`` of its steps there: its jitter.
#: Those points are put in energy order, as Larch's ``pre_edge`` does; a longer step back
#: (two points swapped, a second sweep) is refused.
JITTER_STEP = 0.5
MAX_JITTER = 0.01
#: Words in a column name that make it a candidate for the energy before the others.
_ENERGY_WORDS = ("energ", "kev", "mono", "bragg", "angle", "theta")

_XDI_COLUMN = re.compile(r"^#\s*Column\.(\d+)\s*:\s*(\S+)", re.IGNORECASE)
_XDI_FIELD = re.compile(r"^#\s*([A-Za-z_][\w]*\.[\w.]+)\s*:\s*(.*)$")
_LEADING_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
#: One entry of a LabVIEW file's "readable list of column headings" ("11) XSP3:PbLa_Sum"):
#: a name runs to the next number and parenthesis after a space ("Mono Energy (alt) *").
_LEGEND_ENTRY = re.compile(r"(?:^|\s)(\d{1,3})\)\s+(.*?)(?=\s+\d{1,3}\)\s|\s*$)")
_D_SPACING = re.compile(r"\bd[\s_-]*(?:spacing)?\s*[=:]?\s*(\d+\.\d+)\s*(?:A\b|Å|angstr)", re.I)


def read_xdi(path: Path, lines: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Columns and ``Namespace.field`` metadata of an XDI file (or a plain '#' column file)."""
    comments = [line for line in lines if line.lstrip().startswith("#")]
    metadata: dict[str, str] = {}
    xdi_names: dict[int, str] = {}
    for line in comments:
        if m := _XDI_COLUMN.match(line):
            xdi_names[int(m.group(1))] = m.group(2)
        elif m := _XDI_FIELD.match(line):
            metadata[m.group(1)] = m.group(2).strip()
    try:
        data = np.loadtxt(path, comments="#", ndmin=2, delimiter=None)
    except ValueError as exc:
        # numpy's own advice ('use usecols') is no option of Calypso's: keep its finding.
        finding = str(exc).split(";")[0]
        if "number of columns changed" in finding:
            raise RawDataError(
                f"{path}: {finding} of the data: a row is cut short or extra values were "
                "written; the file is damaged or was copied while being written, copy it again"
            ) from None
        raise RawDataError(
            f"{path}: not a column file of numbers ({finding}); expected XDI or "
            "whitespace-separated columns under a '#' header"
        ) from None
    if data.size == 0 or data.shape[1] < 2:
        raise RawDataError(f"{path}: no data columns found")
    n_columns = data.shape[1]
    names: list[str] = []
    if xdi_names and max(xdi_names) <= n_columns:
        names = [xdi_names.get(i + 1, f"col{i + 1}") for i in range(n_columns)]
    else:
        for line in reversed(comments):
            words = line.lstrip("#").replace(",", " ").split()
            if len(words) == n_columns:
                names = words
                break
    if not names:
        names = [f"col{i + 1}" for i in range(n_columns)]
    return {name: data[:, i] for i, name in enumerate(names)}, metadata


def header_number(value: str | None) -> float | None:
    """The positive number a header field starts with, its unit after it ('3.1356 Å' -> 3.1356);
    None when it holds none.

    >>> header_number("3.1356369 Å"), header_number("n/a"), header_number(None)
    (3.1356369, None, None)
    """
    match = _LEADING_NUMBER.match(value or "")
    return float(match.group(0)) if match and float(match.group(0)) > 0 else None


def _larch_io(path: Path) -> ModuleType:
    """``larch.io``, imported now (seconds: only when a file needs it)."""
    from calypso.registry.access.landlock import imported

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Outside a proposal's confinement: larch looks for a temporary folder and
            # its configuration as it is imported (registry/access/landlock.py).
            return imported("larch.io")
    except ImportError:
        raise RawDataError(
            f"{path}: reading this layout needs xraylarch (a Calypso dependency): "
            "pip install xraylarch, or convert the file to XDI"
        ) from None


def read_with_larch(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Columns of any column file Larch reads, and the metadata the energy search needs."""
    read_ascii = _larch_io(path).read_ascii
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            group = read_ascii(str(path))
        except Exception as exc:  # Larch raises anything on a file it cannot parse
            raise RawDataError(
                f"{path}: not a column file Larch can read ({type(exc).__name__}: {exc}); "
                "expected XDI, SPEC, or columns of numbers under a header"
            ) from None
    data = np.asarray(getattr(group, "data", np.empty((0, 0))), dtype=np.float64)
    labels = list(getattr(group, "array_labels", []))
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] < 2:
        raise RawDataError(f"{path}: no data columns found")
    metadata: dict[str, str] = {}
    header = "\n".join(str(line) for line in getattr(group, "header", []))
    d_spacing = float(getattr(group, "mono_dspace", 0) or 0)
    if d_spacing <= 0 and (m := _D_SPACING.search(header)):
        d_spacing = float(m.group(1))
    if d_spacing > 0:
        metadata["Mono.d_spacing"] = f"{d_spacing}"
    if (column := getattr(group, "energy_column", None)) and 0 < int(column) <= len(labels):
        metadata["Larch.energy_column"] = labels[int(column) - 1]
    if (units := str(getattr(group, "energy_units", "") or "")) in ("keV", "eV", "deg"):
        metadata["Larch.energy_units"] = units
    names = labels if len(labels) == data.shape[0] else [f"col{i + 1}" for i in range(len(data))]
    names = _legend_names(getattr(group, "header", []), len(data)) or names
    return {name: data[i] for i, name in enumerate(names)}, metadata


def _legend_names(header: list[str], n_columns: int) -> list[str] | None:
    """The column names of an APS LabVIEW scan file (20-BM, 9-BM, 20-ID) from its
    "readable list of column headings", named as Larch names columns; None for a file
    without one, or whose list does not number every column.

    Larch reads that list too, but splits it at every ')': a name with one in it
    ("Mono Energy (alt) *", APS 20-ID 2022) shifts every name after it by a column, and
    loses one, so its labels put a channel's name on another's counts.
    """
    from pyshortcuts import fix_varname  # Larch's own, installed with it

    lines = [str(line).lstrip("#").strip() for line in header]
    starts = [i for i, line in enumerate(lines) if "readable list of column" in line]
    if not starts:
        return None
    found: dict[int, str] = {}
    for line in lines[starts[0] + 1 :]:
        entries = _LEGEND_ENTRY.findall(line)
        if not entries:
            break
        for number, name in entries:
            found[int(number)] = fix_varname(name.strip().rstrip("*").strip().lower())
    if sorted(found) != list(range(1, n_columns + 1)):
        return None
    names = [found[i + 1] for i in range(n_columns)]
    # Two columns of one name: the second one keeps its number, as Larch does.
    return [name if name not in names[:i] else f"{name}_col{i + 1}" for i, name in enumerate(names)]


def athena_groups(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The spectra of an Athena project: group label -> energy, mu (and i0 when stored)."""
    read_athena = _larch_io(path).read_athena
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            project = read_athena(str(path), do_preedge=False, do_bkg=False, do_fft=False)
        except Exception as exc:  # Larch raises anything on a broken project
            raise RawDataError(
                f"{path}: not an Athena project Larch can read ({type(exc).__name__}: {exc})"
            ) from None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, group in project.groups.items():
        energy, mu = getattr(group, "energy", None), getattr(group, "mu", None)
        if energy is None or mu is None:
            continue  # a group of another kind (chi(k) only): no spectrum to reduce
        columns = {"energy": np.asarray(energy, float), "mu": np.asarray(mu, float)}
        if (i0 := getattr(group, "i0", None)) is not None and np.size(i0) == np.size(energy):
            columns["i0"] = np.asarray(i0, float)
        groups[str(name)] = columns
    if not groups:
        raise RawDataError(f"{path}: the Athena project holds no mu(E) spectrum")
    return groups


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise RawDataError(f"{path} cannot be read: {exc}") from None


def _lines(path: Path) -> list[str]:
    return _text(path).splitlines()


def spec_scans(path: Path) -> dict[str, list[str]]:
    """The scans of a SPEC file of several (``#S`` lines): scan name -> its lines, each
    after the file header; empty for a file of one scan."""
    lines = _lines(path)
    starts = [i for i, line in enumerate(lines) if line.startswith("#S ")]
    if len(starts) < 2:
        return {}
    scans: dict[str, list[str]] = {}
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else len(lines)
        words = lines[start].split()
        name = words[1] if len(words) > 1 and words[1].isdigit() else str(index + 1)
        while name in scans:  # a scan number repeated: keep both
            name += "'"
        scans[name] = lines[: starts[0]] + lines[start:stop]
    return scans


def read_columns(
    path: Path, scan: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Columns and metadata of an XDI file, any column file Larch reads, or one scan of a
    SPEC file of several."""
    if scan is not None:
        scans = spec_scans(path)
        if scan not in scans:
            raise RawDataError(f"{path}: no scan {scan}; its scans: {', '.join(scans)}")
        # Larch reads files: the scan goes to a temporary one, beside nothing else, where
        # a run held inside its proposal may write it.
        with scratch_folder("calypso-spec-") as folder:
            part = Path(folder) / path.name
            part.write_text("\n".join(scans[scan]) + "\n")
            columns, metadata = read_with_larch(part)
        return columns, metadata
    text = _text(path)
    _refuse_a_cut_last_row(path, text)
    lines = text.splitlines()
    if lines and lines[0].lstrip("# ").upper().startswith("XDI/"):
        return read_xdi(path, lines)
    return read_with_larch(path)


def _refuse_a_cut_last_row(path: Path, text: str) -> None:
    """Refuse a file cut inside its last value: it ends without a line end, and its last
    value is shorter than that column's in each of the rows before (``119919.4`` cut to
    ``5`` reads as a number: a spectrum's last point wrong, and complete-looking)."""
    if not text or text.endswith(("\n", "\r")):
        return
    rows = []
    for line in reversed(text.rsplit("\n", 12)[1:]):  # the last lines only: a map is long
        words = line.replace(",", " ").split()
        if words and all(_LEADING_NUMBER.fullmatch(w) for w in words):
            rows.append(words)
        elif words:
            break  # a comment or a header: the rows of numbers are above it
        if len(rows) > 5:
            break
    if len(rows) < 3 or any(len(row) != len(rows[0]) for row in rows):
        return
    last, before = rows[0][-1], [row[-1] for row in rows[1:]]
    if len(last) < min(len(value) for value in before):
        raise RawDataError(
            f"{path}: its last row looks cut: the file ends without a line end, inside a "
            f"value ('{last}' where the rows before hold '{before[0]}'); it was copied while "
            "being written? Copy it again (if it is complete, end its last line)"
        )


def jitter_steps(axis: np.ndarray) -> int | None:
    """How many steps of a scan's axis go against its direction by its readback's jitter:
    0 for a monotonic axis; None where it goes back further (more than ``JITTER_STEP`` of
    the median of the steps around) or more often (over ``MAX_JITTER`` of its points).
    Repeated values are no steps back (``absorption.separate_repeats``). A first point
    inside the range of the others counts as one, however far back the scan then goes:
    the monochromator read before it settled at the scan's start (a C K-edge XANES whose
    first point, 275.8 eV, comes before 274.9 eV and the rest).

    >>> jitter_steps(np.array([1.0, 2, 3, 2.98, 5])), jitter_steps(np.array([1.0, 2, 3, 2, 4]))
    (1, None)
    >>> jitter_steps(np.array([3.0, 1, 2, 4, 5])), jitter_steps(np.array([9.0, 1, 2, 4, 5]))
    (1, None)
    """
    direction = np.sign(axis[-1] - axis[1]) if axis.size > 2 else np.sign(axis[-1] - axis[0])
    steps = np.diff(axis) * direction
    back = steps < 0
    if not back.any():
        return 0
    if back.sum() > max(1, MAX_JITTER * axis.size):
        return None
    rest = axis[1:]
    for index in np.flatnonzero(back):  # against the steps around it: scans change step
        if index == 0 and rest.min() < axis[0] < rest.max():
            continue
        around = np.abs(steps[max(0, index - 5) : index + 6])
        if -steps[index] > JITTER_STEP * np.median(around):
            return None
    return int(back.sum())


def _monotonic(values: np.ndarray) -> bool:
    """An axis: finite, never standing still, going one way but for its jitter."""
    if values.size <= 10 or not np.all(np.isfinite(values)) or np.any(np.diff(values) == 0):
        return False
    return jitter_steps(values) is not None


def energy_by_content(
    columns: dict[str, np.ndarray],
    d_spacing: float | None,
    prefer: str | None = None,
    angle_hint: bool = False,
) -> tuple[str, str] | None:
    """The column that holds the energy, and its unit ("eV", "keV" or "deg"), by its values.

    A column is the energy when it is monotonic and spans a scan across an edge:
    eV (100 eV to 200 keV, over 20 eV), keV (the same range / 1000), or a Bragg
    angle (2-85°, when ``d_spacing`` is known, giving an energy in range).
    Columns are tried in order (``prefer`` first, then those whose name speaks of
    energy or angle): index, time and counter
    columns before the energy are passed over, as they are not monotonic or not
    in range. Values of 2-85 may be keV or degrees: degrees when the column's
    name says so (angle, theta, bragg) or ``angle_hint`` (the header says so); a column
    so named is never an energy.

    Examples
    --------
    >>> index = np.ones(50)
    >>> angle = np.linspace(17.4, 13.9, 50)
    >>> energy_by_content({"time": index, "angle": angle, "i0": index}, 3.1355)
    ('angle', 'deg')
    >>> energy_by_content({"time": index, "e": 6.3 + np.arange(50) / 100}, None)
    ('e', 'keV')
    """
    # Larch's guess first, then the names that speak of energy or angle (a clock column in
    # seconds may pass for eV), then the rest in the file's order.
    named = [n for n in columns if any(w in n.lower() for w in _ENERGY_WORDS)]
    order = list(dict.fromkeys([*([prefer] if prefer in columns else []), *named, *columns]))
    low, high = ENERGY_RANGE_EV
    for name in order:
        values = np.asarray(columns[name], dtype=np.float64)
        if values.ndim != 1 or not _monotonic(values):
            continue
        lo, hi = float(values.min()), float(values.max())
        if low <= lo and hi <= high and hi - lo >= MIN_SPAN_EV:
            return name, "eV"
        named_angle = any(word in name.lower() for word in ("ang", "theta", "bragg", "deg"))
        if d_spacing and ANGLE_RANGE_DEG[0] <= lo and hi <= ANGLE_RANGE_DEG[1]:
            energy = mono_energy(values, d_spacing)
            angle_fits = low <= energy.min() and energy.max() <= high
            if angle_fits and (named_angle or (angle_hint and "kev" not in name.lower())):
                return name, "deg"
        if named_angle and not any(word in name.lower() for word in ("energ", "kev")):
            # An angle by name is never an energy: ESRF SNBL's TwoTheta (9.9-10.3 deg)
            # passed for keV, before its ZapEnergy, and the spectrum came out 860 eV low.
            continue
        if low <= 1e3 * lo and 1e3 * hi <= high and 1e3 * (hi - lo) >= MIN_SPAN_EV:
            return name, "keV"
    return None
