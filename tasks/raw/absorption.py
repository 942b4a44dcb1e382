"""mu(E) from a spectrum source's columns (:mod:`calypso.tasks.raw.spectra` reads them).

The energy column is the one named, else found by its values (monotonic, in eV or keV,
or a mono angle with the header's d-spacing); energies in keV are detected (all values
below 200) and converted, and a falling energy is turned round. mu(E) is transmission,
fluorescence or a mu column, with the reference foil's channel when there is one; a
single spectrum's few dropouts are left out, as Larch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw import spectrum_files
from calypso.tasks.raw.spectra import COLUMN_NAMES, ColumnTable
from calypso.techniques.spectroscopy import SpectroscopyParameters, mono_energy


@dataclass
class Absorption:
    """Energy (eV) and mu(E) of a batch, and the reference channel when there is one."""

    energy: np.ndarray  # (m,) or (n, m)
    mu: np.ndarray  # (n, m)
    mu_reference: np.ndarray | None  # (n, m) ln(It / Iref)
    mode: str
    metadata: dict[str, str]
    #: A single spectrum's points left out, where mu(E) is not finite (eV; a dropout).
    points_left_out: tuple[float, ...] = ()
    #: What was done to the columns that the run's summary should say.
    notes: tuple[str, ...] = ()


def _rows(values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(values, (n, values.shape[-1])) if values.ndim == 1 else values


#: At most this fraction of a single spectrum's points, where mu(E) is not finite, are left
#: out as dropouts (:func:`_without_dropouts`); more: the spectrum is refused.
MAX_DROPOUTS = 0.01

#: Step (eV) put between repeated energies, as Larch does (``TINY_ENERGY``).
REPEAT_STEP = 0.0005

#: Where absorption edges are (eV): from soft X-rays (Li K, 55 eV) to U K (115.6 keV).
EDGES_EV = (30.0, 130_000.0)


def separate_repeats(energy: np.ndarray) -> np.ndarray:
    """The energy with repeated values (a scan that waits at its start) moved apart by
    ``REPEAT_STEP`` each, as Larch's ``remove_dups`` does, so they stay points of the
    spectrum; a scan that goes back in energy is still refused later."""
    steps = np.diff(energy, axis=-1)
    repeated = np.abs(steps) < REPEAT_STEP
    if not np.any(repeated):
        return energy
    added = np.zeros(energy.shape)
    for j in range(1, energy.shape[-1]):  # runs of repeats add up
        added[..., j] = np.where(repeated[..., j - 1], added[..., j - 1] + REPEAT_STEP, 0.0)
    direction = np.sign(energy[..., -1:] - energy[..., :1])
    return energy + direction * added


def finite_axis(table: ColumnTable, name: str | None, role: str) -> np.ndarray:
    """Column ``name``, the axis of a spectrum, refused when a value is NaN or infinite:
    every later step (edge search, interpolation, merging) fails or goes wrong on one."""
    assert name is not None
    values = np.asarray(table.columns[name], dtype=np.float64)
    bad = ~np.isfinite(values)
    if np.any(bad):
        point = int(np.argwhere(bad)[0][-1])
        raise RawDataError(
            f"{table.where}: the {role} column {name!r} is NaN or infinite at "
            f"{int(bad.sum())} of its {bad.size} values (first at point {point + 1}): a "
            "spectrum's axis must be finite everywhere; fix or drop those points of the file"
        )
    return values


def _energy(table: ColumnTable, p: SpectroscopyParameters) -> np.ndarray:
    """The energy (eV) of a source: the named column, else the one whose values are an energy."""
    d_spacing = p.d_spacing or spectrum_files.header_number(table.metadata.get("Mono.d_spacing"))
    name, unit = energy_column(table, p)
    if unit == "deg":
        return mono_energy(finite_axis(table, name, "mono angle"), float(d_spacing or 0.0))
    energy = finite_axis(table, name, "energy")
    if unit == "keV" or (unit == "auto" and np.nanmax(energy) < 200):
        energy = energy * 1000.0
    low, high = float(np.min(energy)), float(np.max(energy))
    if unit in ("eV", "keV") and not (EDGES_EV[0] <= high and low <= EDGES_EV[1]):
        # A unit given that the values deny: an edge search on 9 eV (or 9 MeV) failed deep
        # in numpy's gradient, with a traceback.
        other = "eV" if unit == "keV" else "keV"
        raise RawDataError(
            f"{table.where}: the energy column {name!r} read in {unit} "
            f"(energy_unit={unit}) spans {low:.0f}-{high:.0f} eV, where no absorption edge is "
            f"({EDGES_EV[0]:g}-{EDGES_EV[1]:g} eV): its values look like {other}; set "
            f"energy_unit={other}, or leave energy_unit to 'auto'"
        )
    return energy


def energy_column(table: ColumnTable, p: SpectroscopyParameters) -> tuple[str, str]:
    """The column of a source's energy and its unit ('eV', 'keV', 'deg' for a mono angle,
    'auto'): the named column, else the one whose values are an energy."""
    name = table.find(p.energy, "energy", required=False)
    unit = p.energy_unit
    d_spacing = p.d_spacing or spectrum_files.header_number(table.metadata.get("Mono.d_spacing"))
    if name is None:
        found = spectrum_files.energy_by_content(
            table.columns,
            d_spacing,
            prefer=table.metadata.get("Larch.energy_column"),
            angle_hint=table.metadata.get("Larch.energy_units") == "deg",
        )
        if found is None:
            # A NaN makes a column fail the search: say so, it is likely the energy.
            nan = [n for n, v in table.columns.items() if not np.all(np.isfinite(v))]
            raise RawDataError(
                f"{table.where}: no energy column: none has a usual name (tried "
                f"{', '.join(COLUMN_NAMES['energy'])}) and none holds a monotonic energy in eV "
                f"or keV, or a mono angle with a d-spacing in the header; its columns: "
                f"{', '.join(table.columns)}"
                + (f" ({', '.join(nan)}: NaN or infinite values, never an axis)" if nan else "")
                + ". Name it with --set energy=COLUMN, or give mono_angle and d_spacing"
            )
        name, found_unit = found
        unit = found_unit if unit == "auto" or found_unit == "deg" else unit
    return name, unit


def energy_axis(table: ColumnTable, parameters: SpectroscopyParameters) -> np.ndarray:
    """The energies (eV) of ``table``'s points: the energy column, or the mono angle's."""
    p = parameters
    if p.energy is None and p.mono_angle is not None:
        angle = finite_axis(table, table.find(p.mono_angle, "mono_angle"), "mono angle")
        return mono_energy(angle, float(p.d_spacing or 0.0))
    return _energy(table, p)


def absorption(table: ColumnTable, parameters: SpectroscopyParameters) -> Absorption:
    """Energy in eV and mu(E) from a source's columns, as the parameters ask.

    Raises
    ------
    RawDataError
        Naming the source and column: no energy, all-zero I0, missing channels.
    """
    p = parameters
    where = table.where
    energy = energy_axis(table, p)
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
                " no fluorescence channels and no mu column; its columns: "
                f"{', '.join(table.columns)}. Name them, e.g. --set i0=COLUMN --set it=COLUMN "
                "or --set fluorescence='[\"fx*\"]'"
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
        if not np.any(it != 0):
            raise RawDataError(
                f"{where}: It ({table.find(p.it, 'it')}) is zero everywhere: this scan was not "
                "measured in transmission, or that is the wrong counter; name the fluorescence "
                "channels with --set fluorescence='[\"COLUMN\"]', or It with --set it=COLUMN; "
                f"its columns: {', '.join(table.columns)}"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.divide(i0, it)
            np.log(mu, out=mu)  # in place: one batch-sized array, not two
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
            mu_reference = np.divide(
                _rows(table.columns[it_name], n), _rows(table.columns[iref_name], n)
            )
            np.log(mu_reference, out=mu_reference)
    points_left_out: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()
    if mu.shape[0] == 1:
        energy, mu, mu_reference, points_left_out = _without_dropouts(energy, mu, mu_reference)
        axis = np.asarray(energy, dtype=np.float64).reshape(-1)
        if back := spectrum_files.jitter_steps(axis):
            # Each point keeps its mu: it was measured at the energy read back.
            order = np.argsort(axis * np.sign(axis[-1] - axis[0]), kind="stable")
            notes = (
                f"{where}: the energy steps back at {back} point(s) (the monochromator's "
                "readback, by less than half a step, or a first point read before it settled): "
                "those points are put in energy order, as Larch does",
            )
            energy, mu = np.asarray(energy)[..., order], mu[:, order]
            mu_reference = None if mu_reference is None else mu_reference[:, order]
    if mu_reference is not None:
        # A reference channel without signal cannot calibrate; but where mu(E) itself is not
        # finite (a map's pixel where the beam was lost, left out) it need not.
        unusable = ~np.isfinite(mu_reference).all(axis=-1) & np.isfinite(mu).all(axis=-1)
        if np.any(unusable):
            mu_reference = None
    energy = separate_repeats(np.asarray(energy, dtype=np.float64))
    if energy.shape[-1] > 1 and np.all(energy[..., -1] < energy[..., 0]):
        # Scans run down in energy too (a mono angle rising): turn them round.
        energy, mu = energy[..., ::-1], mu[..., ::-1]
        mu_reference = None if mu_reference is None else mu_reference[..., ::-1]
    return Absorption(
        energy=np.ascontiguousarray(energy),
        # A copy only where mu is not already an array of its own (a column, a view).
        mu=np.require(mu, np.float64, ["C_CONTIGUOUS", "OWNDATA"]),
        mu_reference=mu_reference,
        mode=mode,
        metadata=table.metadata,
        points_left_out=points_left_out,
        notes=notes,
    )


def transmission_or_mu_column(
    table: ColumnTable, parameters: SpectroscopyParameters
) -> tuple[SpectroscopyParameters, str | None]:
    """'auto' mode's choice for a file with It and a mu column of its own: transmission,
    unless It is zero or negative at more than ``MAX_DROPOUTS`` of the first spectrum's
    points (a fluorescence measurement on a sample no beam crosses, the file's mu column
    its fluorescence): then that column, and a note saying so. A file of two columns, no
    I0, It or mu column by name: the one that is not the energy. Decided once for a run."""
    p = parameters
    if p.mode != "auto" or p.fluorescence or p.it is not None:
        return p, None
    i0_name = table.find(p.i0, "i0", required=False)
    it_name = table.find(None, "it", required=False)
    mu_name = table.find(p.mu_column, "mu_column", required=False)
    if it_name is None and mu_name is None and i0_name is None and len(table.columns) == 2:
        # Two columns and no names to go by (a header-less file: col1, col2): the energy
        # and mu(E), as a user would read it (ESRF ID24's Cu foil, in keV). Not where the
        # second is a counter by name: SESAME's mono scan of I0 alone is no spectrum.
        energy_name, _ = energy_column(table, p)
        (other,) = (name for name in table.columns if name != energy_name)
        note = (
            f"{table.where}: two columns, {energy_name!r} the energy: mu(E) is {other!r} "
            "(--set mu_column=..., or i0 and it, to say otherwise)"
        )
        return p.model_copy(update={"mode": "mu", "mu_column": other}), note
    if i0_name is None or it_name is None or mu_name is None:
        return p, None
    i0, it = (_rows(table.columns[name], 1)[0] for name in (i0_name, it_name))
    with np.errstate(divide="ignore", invalid="ignore"):
        usable = np.isfinite(i0 / it) & (i0 / it > 0)
    unusable = int(usable.size - np.count_nonzero(usable))
    if unusable <= MAX_DROPOUTS * usable.size:
        return p, None
    note = (
        f"{table.where}: It ({it_name}) is zero or negative at {unusable} of its {usable.size} "
        f"points: mu(E) is the file's own {mu_name!r} column, not transmission (--set "
        "mode=transmission to insist)"
    )
    return p.model_copy(update={"mode": "mu", "mu_column": mu_name}), note


def _without_dropouts(
    energy: np.ndarray, mu: np.ndarray, mu_reference: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """A single spectrum without the few points where mu(E) is not finite (I0 or It read
    zero there: a dropout), as Larch's ``pre_edge`` drops them, and their energies. More
    than ``MAX_DROPOUTS`` of its points are kept, and refused by the reduction: a sample
    no beam gets through, or the beam lost, is not a dropout."""
    bad = ~np.isfinite(mu[0])
    count = int(np.count_nonzero(bad))
    if count == 0 or count > MAX_DROPOUTS * bad.size:
        return energy, mu, mu_reference, ()
    keep = ~bad
    energy = np.asarray(energy)
    dropped = tuple(float(e) for e in np.broadcast_to(energy, mu.shape)[0][bad])
    reference = None if mu_reference is None else mu_reference[:, keep]
    return energy[..., keep], mu[:, keep], reference, dropped
