"""Reading XAS counters: Bliss energy scans, XDI files and plain column files.

A *spectrum source* is one Bliss scan or one text file. A Bliss scan holds one
spectrum (1D counters) or many (2D counters, one row a spectrum: mapping and
time-resolved scans). Columns are found by name, case-insensitively, from the
parameters or from the usual names below; fluorescence channels may be glob
patterns. Energies in keV are detected (all values below 200) and converted.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw import bliss
from calypso.techniques.spectroscopy import SpectroscopyParameters, mono_energy

#: Usual counter and column names, tried in order when a parameter is not set.
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "energy": ("energy", "energy_enc", "energy_cor", "mono_energy", "energyc", "ene", "e"),
    "i0": ("i0", "iodet", "mon", "i_0", "izero"),
    "it": ("it", "itrans", "i1", "i_t", "idet"),
    "iref": ("iref", "i2", "irefer", "i_ref"),
    "mu_column": ("mu", "mutrans", "mu_trans", "xmu", "mufluor", "mu_fluo", "mu_fluor"),
}
TEXT_SUFFIXES = (".xdi", ".dat", ".txt", ".xmu", ".asc", ".csv")


class SpectrumSource(BaseModel):
    """Where spectra come from: a Bliss scan (``scan`` set) or a text file."""

    model_config = ConfigDict(frozen=True)

    path: str
    scan: int | None = None
    n_spectra: int = 1
    n_points: int
    title: str = ""
    start_time: str | None = None
    end_time: str | None = None

    def describe(self) -> str:
        return f"{self.path} scan {self.scan}" if self.scan is not None else self.path

    @property
    def label(self) -> str:
        return f"{self.scan}.1" if self.scan is not None else Path(self.path).stem


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

_XDI_COLUMN = re.compile(r"^#\s*Column\.(\d+)\s*:\s*(\S+)", re.IGNORECASE)
_XDI_FIELD = re.compile(r"^#\s*([A-Za-z_][\w]*\.[\w.]+)\s*:\s*(.*)$")


def read_text_spectrum(path: str | Path) -> ColumnTable:
    """Columns of an XDI file or a plain column file whose last comment line names them."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path} does not exist")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise RawDataError(f"{path} cannot be read: {exc}") from None
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
        raise RawDataError(
            f"{path}: not a column file of numbers ({exc}); expected XDI or whitespace-separated "
            "columns under a '#' header"
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
    return ColumnTable(
        where=str(path),
        columns={name: data[:, i] for i, name in enumerate(names)},
        metadata=metadata,
    )


def text_source(path: Path) -> SpectrumSource:
    table = read_text_spectrum(path)
    n_points = len(next(iter(table.columns.values())))
    return SpectrumSource(path=str(path), n_points=n_points, title=path.name)


# -- Bliss scans -------------------------------------------------------------------


def read_bliss_counters(
    path: str | Path, scan: int, start: int = 0, stop: int | None = None
) -> ColumnTable:
    """The 1D and 2D counters of scan ``scan``; 2D counters sliced to spectra ``start:stop``."""
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
                    columns[name] = np.asarray(item[start:stop], dtype=np.float64)
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
        if not info.complete:
            raise RawDataError(
                f"{path}: scan {number} has no end_time, so Bliss is still writing it; "
                "run again once the scan has finished"
            )
        with bliss.open_raw(path) as h5:
            shape = h5[f"{number}.1/measurement/{name}"].shape
            n_spectra = 1
            counters_2d = [
                h5[f"{number}.1/measurement/{c}"].shape
                for c in h5[f"{number}.1/measurement"]
                if getattr(h5[f"{number}.1/measurement"].get(c), "ndim", 0) == 2
            ]
        if counters_2d:
            n_spectra = counters_2d[0][0]
        n_points = shape[-1]
        sources.append(
            SpectrumSource(
                path=str(path),
                scan=number,
                n_spectra=n_spectra,
                n_points=n_points,
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


def read_source(source: SpectrumSource, start: int = 0, stop: int | None = None) -> ColumnTable:
    """The columns of one source; 2D counters sliced to spectra ``start:stop``."""
    if source.scan is not None:
        return read_bliss_counters(source.path, source.scan, start, stop)
    return read_text_spectrum(source.path)


# -- from columns to mu(E) ------------------------------------------------------------


@dataclass
class Absorption:
    """Energy (eV) and mu(E) of a batch, and the reference channel when there is one."""

    energy: np.ndarray  # (m,) or (n, m)
    mu: np.ndarray  # (n, m)
    mu_reference: np.ndarray | None  # (n, m) ln(It / Iref)
    mode: str
    metadata: dict[str, str]


def _rows(values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(values, (n, values.shape[-1])) if values.ndim == 1 else values


def absorption(table: ColumnTable, parameters: SpectroscopyParameters) -> Absorption:
    """Energy in eV and mu(E) from a source's columns, as the parameters ask.

    Raises
    ------
    RawDataError
        Naming the source and column: no energy, all-zero I0, missing channels.
    """
    p = parameters
    where = table.where
    if p.energy is None and p.mono_angle is not None:
        angle = table.columns[table.find(p.mono_angle, "mono_angle")]
        energy = mono_energy(angle, float(p.d_spacing or 0.0))
    else:
        energy = table.columns[table.find(p.energy, "energy")]
        keV = p.energy_unit == "keV" or (p.energy_unit == "auto" and np.nanmax(energy) < 200)
        if keV:
            energy = energy * 1000.0
    n = max((v.shape[0] for v in table.columns.values() if v.ndim == 2), default=1)
    mode = p.mode
    it_name = table.find(p.it, "it", required=False)
    if mode == "auto":
        if p.fluorescence:
            mode = "fluorescence"
        elif it_name is not None:
            mode = "transmission"
        elif table.find(p.mu_column, "mu_column", required=False):
            mode = "mu"
        else:
            raise RawDataError(
                f"{where}: cannot make mu(E): no It column (tried {', '.join(COLUMN_NAMES['it'])}),"
                " no fluorescence channels and no mu column; set mode and the columns, e.g. "
                "--set it=COUNTER or --set fluorescence='[\"fx*\"]'"
            )
    if mode in ("transmission", "fluorescence"):
        i0 = _rows(table.columns[table.find(p.i0, "i0")], n)
        if not np.any(i0 != 0):
            raise RawDataError(
                f"{where}: I0 ({table.find(p.i0, 'i0')}) is zero everywhere: no beam, or the "
                "wrong counter; name the incident intensity with --set i0=COUNTER"
            )
    if mode == "transmission":
        it = _rows(table.columns[table.find(p.it, "it")], n)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.log(i0 / it)
    elif mode == "fluorescence":
        if not p.fluorescence:
            raise ParameterError("mode 'fluorescence' needs the channels: --set fluorescence=[...]")
        channels = table.match(p.fluorescence, "fluorescence")
        icr = table.match(p.icr, "icr") if p.icr else []
        ocr = table.match(p.ocr, "ocr") if p.ocr else []
        if icr and not (len(icr) == len(ocr) == len(channels)):
            raise RawDataError(
                f"{where}: {len(channels)} fluorescence channels but {len(icr)} ICR and "
                f"{len(ocr)} OCR columns: give one of each per channel"
            )
        from calypso.techniques.spectroscopy import fluorescence_mu

        mu = fluorescence_mu(
            [_rows(table.columns[c], n) for c in channels],
            i0,
            [_rows(table.columns[c], n) for c in icr] or None,
            [_rows(table.columns[c], n) for c in ocr] or None,
        )
    else:
        mu = _rows(table.columns[table.find(p.mu_column, "mu_column")], n)
    mu_reference = None
    iref_name = table.find(p.iref, "iref", required=False)
    if iref_name is not None and it_name is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            mu_reference = np.log(
                _rows(table.columns[it_name], n) / _rows(table.columns[iref_name], n)
            )
        if not np.all(np.isfinite(mu_reference)):
            mu_reference = None  # a reference channel without signal cannot calibrate
    return Absorption(
        energy=np.asarray(energy, dtype=np.float64),
        mu=np.array(mu, dtype=np.float64),
        mu_reference=mu_reference,
        mode=mode,
        metadata=table.metadata,
    )
