"""Reading XAS counters: Bliss energy scans, XDI, beamline column files, Athena projects.

A *spectrum source* is one Bliss scan, one text file, one scan of a SPEC file or
one group of an Athena project (text and project files:
:mod:`calypso.tasks.raw.spectrum_files`). A Bliss scan holds one spectrum (1D
counters) or many (2D counters, one row a spectrum: mapping and time-resolved
scans). Columns are found by name, case-insensitively, from the parameters or
from the usual names below; fluorescence channels may be glob patterns. mu(E) is made
from the columns by :mod:`calypso.tasks.raw.absorption`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import RawDataError
from calypso.tasks.raw import bliss, spectrum_files
from calypso.techniques.spectroscopy import SpectroscopyParameters

#: Usual counter and column names, tried in order when a parameter is not set.
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "energy": (
        "energy",
        "energy_enc",
        "energy_cor",
        "mono_energy",
        "energyc",
        "ene",
        "e",
        "ebraggenergy",
        "energyachieved",
        "achieved_energy",
        "e_kev",
        "energy_kev",
        "ev",  # Athena's and many a beamline's exports: the energy in eV
        "zapenergy",  # ESRF's continuous (zap) scans
    ),
    "i0": ("i0", "iodet", "mon", "i_0", "izero", "io"),
    "it": ("it", "itrans", "i1", "i_t", "idet"),
    "iref": ("iref", "i2", "irefer", "i_ref", "ir"),
    # Last, 'norm': mu(E) normalised already (Athena's export of a normalised spectrum).
    # 'log(i0/it)' as Larch names it: SSRL's and other collectors' transmission mu(E).
    "mu_column": (
        *("mu", "mutrans", "mu_trans", "xmu", "mufluor", "mu_fluo", "mu_fluor"),
        *("log_i0_it", "ln_i0_it", "norm"),
    ),
}
TEXT_SUFFIXES = (".xdi", ".dat", ".txt", ".xmu", ".asc", ".csv", ".prj", ".spec")


class SpectrumSource(BaseModel):
    """Where spectra come from: a Bliss scan (``scan`` set) or a text file."""

    model_config = ConfigDict(frozen=True)

    path: str
    scan: int | None = None
    group: str | None = None  # an Athena project's group, or a scan of a SPEC file of several
    n_spectra: int = 1
    n_points: int
    # A Bliss map scanned an energy at a time: its 2D counters hold an energy point a row
    # (every spectrum growing together), read transposed.
    energy_rows: bool = False
    title: str = ""
    start_time: str | None = None
    end_time: str | None = None

    def describe(self) -> str:
        if self.group is not None:
            kind = "group" if self.path.lower().endswith(".prj") else "scan"
            return f"{self.path} {kind} {self.group}"
        return f"{self.path} scan {self.scan}" if self.scan is not None else self.path

    @property
    def label(self) -> str:
        if self.group is not None and self.path.lower().endswith(".prj"):
            return self.group
        if self.group is not None:
            return f"{Path(self.path).stem}_{self.group}"
        return f"{self.scan}.1" if self.scan is not None else Path(self.path).stem


def _first_word(name: str) -> str:
    return re.split(r"[_\-. ]", name, maxsplit=1)[0]


def numbered(key: str, name: str, *, bare: bool = False) -> bool:
    """Whether column ``key`` (lower case) is the usual ``name`` with a channel or amplifier
    number ('i0-32', 'it_2', 'ifch1'); ``bare``: or ``name`` itself."""
    digits = r"\d*" if bare else r"\d+"
    return re.fullmatch(rf"{re.escape(name)}[_\-. ]?{digits}", key) is not None


@dataclass
class ColumnTable:
    """Named columns of one source; 1D (points) or 2D (spectra × points) arrays."""

    where: str
    columns: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)

    def find(self, wanted: str | None, role: str, required: bool = True) -> str | None:
        """The column name for ``role``: ``wanted`` if given, else the first usual name found."""
        lower = {name.lower(): name for name in self.columns}
        if wanted is not None:
            if wanted.lower() in lower:
                return lower[wanted.lower()]
            raise RawDataError(
                f"{self.where}: no column {wanted!r} for {role}; its columns: "
                f"{', '.join(self.columns)}"
            )
        for candidate in COLUMN_NAMES.get(role, ()):
            if candidate in lower:
                return lower[candidate]
        if role != "energy":  # the energy is found by its values when not by its name
            # A counter named with its scaler channel or amplifier ('I0-32', 'it_2',
            # SLS's 'I0_KEITHLEY1_c4'): the usual name and a number, or the usual name
            # first and then what reads it, when one column alone is so named.
            for candidate in COLUMN_NAMES.get(role, ()):
                hits = [name for key, name in lower.items() if numbered(key, candidate)]
                if len(hits) == 1:
                    return hits[0]
            for candidate in COLUMN_NAMES.get(role, ()):
                hits = [name for key, name in lower.items() if _first_word(key) == candidate]
                if len(hits) == 1:
                    return hits[0]
        if required:
            raise RawDataError(
                f"{self.where}: no {role} column (tried {', '.join(COLUMN_NAMES.get(role, ()))}); "
                f"its columns: {', '.join(self.columns)}. Name it with --set {role}=COLUMN"
            )
        return None

    def match(self, patterns: list[str], role: str) -> list[str]:
        """Columns matching glob ``patterns``, in order, each pattern matching at least one."""
        found: list[str] = []
        for pattern in patterns:
            hits = [n for n in self.columns if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
            if not hits:
                raise RawDataError(
                    f"{self.where}: no column matches {pattern!r} for {role}; its columns: "
                    f"{', '.join(self.columns)}"
                )
            found.extend(h for h in sorted(hits) if h not in found)
        return found


# -- text files -------------------------------------------------------------------


def read_text_spectrum(path: str | Path, group: str | None = None) -> ColumnTable:
    """Columns of a text file (XDI, or any column file Larch reads) or an Athena project group."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path} does not exist")
    if path.suffix.lower() == ".prj":
        groups = spectrum_files.athena_groups(path)
        name = group if group is not None else next(iter(groups))
        if name not in groups:
            raise RawDataError(f"{path}: no group {name!r}; its groups: {', '.join(groups)}")
        return ColumnTable(where=f"{path} group {name}", columns=groups[name])
    columns, metadata = spectrum_files.read_columns(path, group)
    where = str(path) if group is None else f"{path} scan {group}"
    return ColumnTable(where=where, columns=columns, metadata=metadata)


def text_sources(path: Path) -> list[SpectrumSource]:
    """The spectra of a text file (one), a SPEC file (one a scan) or an Athena project (one
    a group)."""
    if path.suffix.lower() == ".prj":
        return [
            SpectrumSource(
                path=str(path),
                group=name,
                n_points=len(columns["energy"]),
                title=f"{path.name} {name}",
            )
            for name, columns in spectrum_files.athena_groups(path).items()
        ]
    sources = []
    for scan in spectrum_files.spec_scans(path) or [None]:
        table = read_text_spectrum(path, scan)
        n_points = len(next(iter(table.columns.values())))
        title = path.name if scan is None else f"{path.name} scan {scan}"
        sources.append(SpectrumSource(path=str(path), group=scan, n_points=n_points, title=title))
    return sources


# -- Bliss scans -------------------------------------------------------------------


def read_bliss_counters(
    path: str | Path,
    scan: int,
    start: int = 0,
    stop: int | None = None,
    energy_rows: bool = False,
) -> ColumnTable:
    """The 1D and 2D counters of scan ``scan``; 2D counters sliced to spectra ``start:stop``
    (their rows, or with ``energy_rows`` their columns, as rows)."""
    with bliss.open_raw(path) as h5:
        entry = f"{scan}.1"
        if entry not in h5:
            raise RawDataError(f"{path} has no scan {scan}")
        measurement = h5[entry].get("measurement")
        columns: dict[str, np.ndarray] = {}
        if measurement is not None:
            for name in measurement:
                try:
                    item = measurement[name]
                except (KeyError, OSError):  # broken external link
                    continue
                if getattr(item, "ndim", 0) == 1:
                    columns[name] = np.asarray(item[()], dtype=np.float64)
                elif getattr(item, "ndim", 0) == 2:
                    columns[name] = counter_spectra(item, start, stop, energy_rows)
        metadata = {}
        for name in ("element", "edge"):
            location = f"{entry}/instrument/xas/{name}"
            if location in h5:
                metadata[f"Element.{'symbol' if name == 'element' else 'edge'}"] = bliss._text(
                    h5[location][()]
                )
    return ColumnTable(where=f"{path} scan {scan}", columns=columns, metadata=metadata)


def bliss_sources(
    path: Path, wanted: list[int] | None, parameters: SpectroscopyParameters
) -> list[SpectrumSource]:
    """The energy scans of a Bliss dataset file (those with an energy or mono angle counter)."""
    infos = {info.number: info for info in bliss.select_scans(path, wanted)}
    numbers = list(infos)
    sources = []
    for number in numbers:
        info = infos[number]
        table = read_bliss_counters(path, number, 0, 1)
        axis = parameters.mono_angle if parameters.energy is None else parameters.energy
        role = "mono_angle" if parameters.energy is None and parameters.mono_angle else "energy"
        try:
            name = table.find(axis, role, required=bool(wanted))
        except RawDataError:
            if wanted:
                raise
            name = None
        if name is None:
            continue
        bliss.require_ended(path, info)
        with bliss.open_raw(path) as h5:
            measurement = h5[f"{number}.1/measurement"]
            shape = measurement[name].shape
            counters_2d = {
                c: measurement[c].shape
                for c in measurement
                if getattr(measurement.get(c), "ndim", 0) == 2
            }
        n_points = shape[-1]
        n_spectra, energy_rows = _spectra_layout(path, number, name, shape, counters_2d)
        sources.append(
            SpectrumSource(
                path=str(path),
                scan=number,
                n_spectra=n_spectra,
                n_points=n_points,
                energy_rows=energy_rows,
                title=info.title,
                start_time=info.start_time,
                end_time=info.end_time,
            )
        )
    if not sources:
        raise RawDataError(
            f"{path}: no scan has an energy counter (tried "
            f"{', '.join(COLUMN_NAMES['energy'])}); name it with --set energy=COUNTER, or give "
            "mono_angle and d_spacing"
        )
    return sources


def counter_spectra(item: Any, start: int, stop: int | None, energy_rows: bool) -> np.ndarray:
    """Spectra ``start:stop`` of a 2D counter (an h5py dataset): its rows, or with
    ``energy_rows`` its columns, as rows."""
    if energy_rows:
        return np.ascontiguousarray(np.asarray(item[:, start:stop], dtype=np.float64).T)
    return np.asarray(item[start:stop], dtype=np.float64)


def energy_point_rows(
    energy_length: int, rows: int, row_length: int, *, final: bool = True
) -> bool | None:
    """Whether 2D counters of ``rows`` x ``row_length`` hold an energy point a row (a map
    scanned an energy at a time: True) or a spectrum a row (False), told by which of their
    dimensions has the energy axis's length; None when neither has. A square layout is a
    spectrum a row, as Bliss writes a 1D detector's spectra; while a scan is written
    (``final`` false) the next point tells instead."""
    by_spectrum, by_energy = energy_length == row_length, energy_length == rows
    if by_spectrum and by_energy and not final:
        return None
    if by_spectrum:
        return False
    return True if by_energy else None


def _spectra_layout(
    path: Path, scan: int, energy: str, energy_shape: tuple, counters_2d: dict[str, tuple]
) -> tuple[int, bool]:
    """How many spectra a Bliss scan holds, and whether its 2D counters hold an energy
    point a row (:func:`energy_point_rows`). 2D counters with no dimension of the energy
    axis's length (an MCA's channels) are not spectra and tell nothing."""
    if not counters_2d:
        return 1, False
    if len(energy_shape) == 2:  # an energy axis a spectrum: a spectrum a row
        return energy_shape[0], False
    layouts = {n: energy_point_rows(energy_shape[0], *shape) for n, shape in counters_2d.items()}
    by_rows = sorted(n for n, layout in layouts.items() if layout is False)
    by_columns = sorted(n for n, layout in layouts.items() if layout is True)
    if by_rows and by_columns:
        raise RawDataError(
            f"{path} scan {scan}: counters {', '.join(by_rows)} hold a spectrum of "
            f"{energy_shape[0]} energies ({energy}) a row, {', '.join(by_columns)} an energy a "
            "row; name the counters of one layout (--set i0=... it=...)"
        )
    if by_columns:
        return counters_2d[by_columns[0]][1], True
    return counters_2d[by_rows[0] if by_rows else next(iter(counters_2d))][0], False


def read_source(source: SpectrumSource, start: int = 0, stop: int | None = None) -> ColumnTable:
    """The columns of one source; 2D counters sliced to spectra ``start:stop``."""
    if source.scan is not None:
        return read_bliss_counters(source.path, source.scan, start, stop, source.energy_rows)
    return read_text_spectrum(source.path, source.group)
