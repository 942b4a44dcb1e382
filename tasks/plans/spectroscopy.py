"""Planning a spectroscopy run: which spectra, which calibration, which batches.

Runs before Prefect or Dask start, so bad input fails in a second: each source
is read (one spectrum of it), turned into mu(E) and normalised once, which
finds a missing column, a non-monotonic energy, an all-zero I0 or a scan that
misses the edge before any work is submitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.preflight import require_output_room, require_registrable
from calypso.tasks.raw import bliss, number_order
from calypso.tasks.raw.absorption import absorption, transmission_or_mu_column
from calypso.tasks.raw.data_policy import RawDataset, output_folder
from calypso.tasks.raw.spectra import (
    TEXT_SUFFIXES,
    SpectrumSource,
    bliss_sources,
    read_source,
    text_sources,
)
from calypso.techniques import spectroscopy as xas

TECHNIQUE = "spectroscopy"
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs")


class SpectraBatch(BaseModel):
    source: SpectrumSource
    start: int
    stop: int


class Calibration(BaseModel):
    """The reference foil's tabulated edge, when the data has a reference channel."""

    element: str
    edge: str
    reference_e0: float


@dataclass(frozen=True)
class FirstSpectrum:
    """What the planner learns from a source's first spectrum that can be reduced."""

    e0: float
    #: E0 of the reference channel; None without one, or where it shows no edge.
    reference_e0: float | None
    metadata: dict[str, str]
    #: What the user should know about the choices made (a summary warning).
    notes: tuple[str, ...] = field(default=())
    #: What 'auto' mode chose where transmission cannot make mu(E): the file's own mu
    #: column, or the fluorescence channels where the edge is (parameters' names).
    chosen: dict[str, Any] = field(default_factory=dict)
    #: Too short above E0 for EXAFS (a XANES scan): reduced without it.
    xanes_only: bool = False
    #: Whether the data decide E0 (:func:`~calypso.techniques.spectroscopy.e0_undecided`).
    e0_decided: bool = True


IN_PROCESS_SPECTRA = 64  # up to this many, no cluster: see SpectroscopyPlan.in_process


class SpectroscopyPlan(BaseModel):
    """Everything the flow needs, checked before any spectrum is reduced."""

    input: str
    raw: RawDataset | None
    raw_file: str | None
    sources: list[SpectrumSource]
    parameters: xas.SpectroscopyParameters
    calibration: Calibration | None
    element: str | None
    edge: str | None
    output_dir: str
    output_file: str
    batch_size: int
    #: What the plan decided that the results should carry as a warning.
    notes: list[str] = []

    @property
    def n_spectra(self) -> int:
        return sum(source.n_spectra for source in self.sources)

    @property
    def in_process(self) -> bool:
        """A few spectra (a file, repeated scans) are milliseconds of work: they are
        reduced in the flow's own process, with no Dask cluster started or round trip."""
        return self.n_spectra <= IN_PROCESS_SPECTRA

    @property
    def repeats(self) -> list[SpectrumSource]:
        """Single-spectrum sources, merged into one spectrum when there are several."""
        return [source for source in self.sources if source.n_spectra == 1]

    @property
    def merges(self) -> bool:
        return self.parameters.merge and len(self.repeats) > 1

    def batches(self) -> list[SpectraBatch]:
        batches = []
        for source in self.sources:
            for start in range(0, source.n_spectra, self.batch_size):
                stop = min(start + self.batch_size, source.n_spectra)
                batches.append(SpectraBatch(source=source, start=start, stop=stop))
        return batches


MAX_BATCH = 2500  # spectra: ~0.25 s of work, ~50 MB a worker holds while reducing them


def default_batch_size(n_spectra: int, workers: int) -> int:
    # At least two batches a worker. At ~0.1 ms a spectrum, MAX_BATCH spectra are enough
    # work to hide Prefect's ~60 ms a task; a batch holds ~20 kB a spectrum while it is
    # reduced (BatchReduction), so a fixed cap keeps a worker's memory the same for a map
    # of 10^4 spectra and one of 10^6 (5,000 made a 10^5 map's peak 14% higher).
    size = math.ceil(n_spectra / (2 * max(workers, 1)))
    return max(min(size, MAX_BATCH), 200)


def _resolve_sources(
    input_path: str, scans: list[int] | None, parameters: xas.SpectroscopyParameters
) -> tuple[RawDataset | None, Path | None, list[SpectrumSource], str]:
    path = Path(input_path).expanduser().absolute()
    if not path.exists():
        raise RawDataError(f"{input_path} does not exist")
    raw: RawDataset | None = None
    if path.is_dir():
        try:
            raw = RawDataset.from_path(path)
        except CalypsoError:
            texts = sorted(
                (p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                key=number_order,
            )
            texts = [p for p in texts if p.suffix.lower() in TEXT_SUFFIXES or _numbered(p)]
            if not texts:
                raise RawDataError(
                    f"{path} is neither a raw dataset folder of the data policy nor a folder of "
                    f"spectrum files ({', '.join(TEXT_SUFFIXES)} or .001, .002 ...)"
                ) from None
            return None, None, [s for p in texts for s in text_sources(p)], path.name
        path = raw.raw_file
        if not path.is_file():
            raise RawDataError(
                f"{raw.raw_dataset_dir} is a raw dataset folder but holds no dataset file "
                f"{path.name}"
            )
    if path.suffix.lower() in HDF5_SUFFIXES:
        if raw is None:
            try:
                raw = RawDataset.from_path(path)
            except CalypsoError:
                raw = None
        return raw, path, bliss_sources(path, scans, parameters), path.stem
    if scans:
        raise ParameterError(f"--scan applies to Bliss files; {path.name} is a text file")
    return None, None, text_sources(path), path.stem.split(".")[0] or path.name


def _numbered(path: Path) -> bool:
    return path.suffix[1:].isdigit()


def normalization_keywords(parameters: xas.SpectroscopyParameters) -> dict[str, Any]:
    """The parameters of :func:`~calypso.techniques.spectroscopy.normalize`, by keyword."""
    p = parameters
    return {
        "e0": p.e0,
        "e0_smooth": p.e0_smooth,
        "pre1": p.pre1,
        "pre2": p.pre2,
        "norm1": p.norm1,
        "norm2": p.norm2,
        "nnorm": p.nnorm,
        "nvict": p.nvict,
    }


def exafs_keywords(parameters: xas.SpectroscopyParameters) -> dict[str, Any]:
    """The parameters of :func:`~calypso.techniques.spectroscopy.autobk`, by keyword."""
    p = parameters
    return {
        "rbkg": p.rbkg,
        "nknots": p.nknots,
        "bkg_kmin": p.bkg_kmin,
        "bkg_kmax": p.bkg_kmax,
        "bkg_kweight": p.bkg_kweight,
        "bkg_dk": p.bkg_dk,
        "clamp_lo": p.clamp_lo,
        "clamp_hi": p.clamp_hi,
        "kweight": p.kweight,
        "kmin": p.kmin,
        "kmax": p.kmax,
        "dk": p.dk,
        "window": p.window,
        "rmax_out": p.rmax_out,
    }


def reduction_keywords(parameters: xas.SpectroscopyParameters) -> dict[str, Any]:
    """The parameters of :func:`~calypso.techniques.spectroscopy.reduce_spectra`, by keyword."""
    return {
        **normalization_keywords(parameters),
        "exafs": parameters.exafs,
        **exafs_keywords(parameters),
    }


#: Spectra of a map tried, spread over it, when its first cannot be reduced.
MAP_SPECTRA_TRIED = 64


def check_source(source: SpectrumSource, parameters: xas.SpectroscopyParameters) -> FirstSpectrum:
    """Read and normalise the first spectrum of ``source``: its E0, reference E0 and metadata.
    A map's first pixel may be off the sample (its spectrum has no edge): then the first of
    :data:`MAP_SPECTRA_TRIED` spectra spread over the map that can be reduced; none of them,
    the first one's error."""
    where, single = source.describe(), source.n_spectra == 1
    try:
        return check_first_spectrum(read_source(source, 0, 1), where, parameters, single=single)
    except RawDataError as first_error:
        if source.n_spectra < 2:
            raise
        tried = np.unique(np.linspace(1, source.n_spectra - 1, MAP_SPECTRA_TRIED - 1).astype(int))
        for index in tried:
            table = read_source(source, index, index + 1)
            try:
                return check_first_spectrum(table, where, parameters, single=False)
            except RawDataError:
                continue
        raise RawDataError(
            f"{first_error} ({tried.size} other spectra spread over the map cannot be reduced "
            "either)"
        ) from None


def check_first_spectrum(
    table: Any, where: str, parameters: xas.SpectroscopyParameters, *, single: bool
) -> FirstSpectrum:
    """Normalise the first spectrum of ``table`` (read offline, or from a growing file by a
    live run) that can be reduced: its E0, reference E0, metadata and what 'auto' chose
    (:func:`as_checked` applies it). None can: the first one's error, naming ``where``.
    ``single``: the source is one spectrum, not a map (whose pixels are checked one by
    one: a weak first pixel does not make fluorescence the better channel for all)."""
    chosen, mode_note = transmission_or_mu_column(table, parameters)
    try:
        first = _first_reducible(table, where, chosen)
    except RawDataError as refused:
        found = _in_fluorescence(table, where, parameters, str(refused))
        if found is None:
            if "its columns:" in str(refused) or not getattr(table, "columns", None):
                raise
            # What to choose from instead (a file's reference foil's mu_ref, say).
            columns = ", ".join(table.columns)
            raise RawDataError(f"{refused}; its columns: {columns}") from refused
        first, chosen, mode_note = found
    else:
        if not first.e0_decided and mode_note is None and single:
            found = _in_fluorescence(table, where, parameters, None)
            if found is not None:
                first, chosen, mode_note = found
    if mode_note is None:
        return first
    choice = {name: getattr(chosen, name) for name in ("mode", "mu_column", "fluorescence")}
    return replace(first, notes=(mode_note, *first.notes), chosen=choice)


def _first_reducible(
    table: Any, where: str, parameters: xas.SpectroscopyParameters
) -> FirstSpectrum:
    data = absorption(table, parameters)
    first_error: RawDataError | None = None
    for row in range(data.mu.shape[0]):
        try:
            return _check_spectrum_row(data, row, where, parameters)
        except RawDataError as exc:
            first_error = first_error or exc
    assert first_error is not None  # a table holds a spectrum at least
    raise first_error


def _in_fluorescence(
    table: Any, where: str, parameters: xas.SpectroscopyParameters, refused: str | None
) -> tuple[FirstSpectrum, xas.SpectroscopyParameters, str] | None:
    """'auto' mode where transmission shows no edge (``refused``: why), or one whose E0 the
    data do not decide (``refused`` None; a dilute sample): the first of the scan's
    fluorescence channels, found by name, whose mu(E) does (and decides E0, in the second
    case); None: none does."""
    p = parameters
    if p.mode != "auto" or p.fluorescence or p.it is not None or p.mu_column is not None:
        return None
    from calypso.tasks.raw.absorption import energy_axis
    from calypso.tasks.raw.fluorescence_channels import fluorescence_candidates

    try:
        energy = energy_axis(table, p)
    except RawDataError:
        return None
    for channels in fluorescence_candidates(table, energy):
        trial = p.model_copy(update={"mode": "fluorescence", "fluorescence": channels})
        try:
            first = _first_reducible(table, where, trial)
        except RawDataError:
            continue
        if refused is not None:
            reason = refused.split(": ")[1 if ": " in refused else 0]
            why = f"transmission gives no mu(E) with an edge ({reason})"
        elif first.e0_decided:
            why = "transmission's E0 is not decided by the data (too noisy)"
        else:
            continue
        note = (
            f"{where}: {why}; mu(E) is the "
            f"fluorescence of {', '.join(channels)} over I0, its edge at "
            f"{first.e0:.1f} eV (--set fluorescence='[...]' to choose the channels, --set "
            "mode=transmission to insist)"
        )
        return first, trial, note
    return None


def _check_spectrum_row(
    data: Any, row: int, where: str, parameters: xas.SpectroscopyParameters
) -> FirstSpectrum:
    energy = np.atleast_2d(data.energy)
    energy = energy[row : row + 1] if energy.shape[0] > 1 else energy
    mu = data.mu[row : row + 1]
    xas.check_spectrum(energy, mu, where)
    normalization = xas.normalize(energy, mu, **normalization_keywords(parameters), where=where)
    if parameters.e0 is None:
        # An edge only the fits make: a step extrapolated beyond mu(E)'s whole range.
        ratio = float(xas.step_to_range(mu, normalization.edge_step)[0])
        if not ratio <= xas.MAX_STEP_TO_RANGE:
            raise RawDataError(
                f"{where}: no absorption edge: the edge step the pre- and post-edge lines give "
                f"({float(normalization.edge_step[0]):.3g}) is {ratio:.1f} times mu(E)'s whole "
                "range (noise, or not the sample's channel); choose the channels (--set "
                "fluorescence=..., --set it=...), or give e0"
            )
    reference_e0, notes = None, data.notes
    if data.mu_reference is not None and parameters.calibrate:
        reference = data.mu_reference[row : row + 1]
        found = xas.find_e0(energy, reference, parameters.e0_smooth)
        # Many scans have a reference chamber and no foil in it: no edge, no calibration.
        if xas.edge_contrast(energy, reference, found)[0] >= xas.MIN_EDGE_CONTRAST:
            reference_e0 = float(found[0])
        else:
            notes = (
                *notes,
                f"{where}: the reference channel shows no absorption edge (no foil?): the energy "
                "is not calibrated; name the reference counter with --set iref=COUNTER, or "
                "calibrate later",
            )
    e0 = float(normalization.e0[0])
    reach = float(np.sqrt(xas.ETOK * max(float(energy[0, -1]) - e0, 0.0)))
    # Decided by the data, not by whether EXAFS was asked for by name: parameters reach a
    # served or deployed run through JSON, which sets every field.
    xanes_only = reach < xas.MIN_EXAFS_K
    if xanes_only and parameters.exafs:
        notes = (
            *notes,
            f"{where}: the scan reaches only k = {reach:.1f} 1/Å above E0: a XANES scan, "
            "reduced without EXAFS",
        )
    elif parameters.exafs:
        xas.autobk(energy, mu, normalization, **exafs_keywords(parameters), where=where)
    undecided = xas.e0_undecided(normalization.edge_noise, normalization.e0_spread)
    return FirstSpectrum(
        e0, reference_e0, data.metadata, notes, xanes_only=xanes_only and parameters.exafs,
        e0_decided=not bool(undecided[0]),
    )  # fmt: skip


def as_checked(
    parameters: xas.SpectroscopyParameters, first: FirstSpectrum
) -> xas.SpectroscopyParameters:
    """The parameters a run goes on with, as its first spectrum decided them: the file's own
    mu column or its fluorescence channels where It cannot make mu(E), no EXAFS for a XANES
    scan."""
    update: dict[str, Any] = {"exafs": False} if first.xanes_only else {}
    update |= first.chosen
    return parameters.model_copy(update=update) if update else parameters


#: A reference channel's edge further than this (eV) from the sample's is another
#: element's foil (chemical shifts and E0 on a white line stay well within it).
FOIL_FROM_SAMPLE_EV = 25.0


def edge_and_calibration(
    parameters: xas.SpectroscopyParameters, first: FirstSpectrum, where: str
) -> tuple[str, str, Calibration | None, list[str]]:
    """The absorption edge (as given, in the file's metadata, or guessed from E0), the
    reference foil's calibration, from a source's first spectrum, and the notes on them.

    The foil is taken to be of the sample's element unless ``element`` or ``reference_e0``
    says otherwise; a reference edge ``FOIL_FROM_SAMPLE_EV`` away from the sample's is
    another element's (an Au foil beside an As sample): not calibrated, with a note.

    Raises
    ------
    ParameterError
        The reference channel's edge is over 50 eV from the foil's tabulated edge.
    """
    metadata, notes = first.metadata, list(first.notes)
    element = parameters.element or metadata.get("Element.symbol")
    edge = parameters.edge if parameters.element else metadata.get("Element.edge", parameters.edge)
    if element is None:
        element, edge = xas.guess_edge(first.e0)
    if not parameters.calibrate or first.reference_e0 is None:
        return element, edge, None, notes
    apart = first.reference_e0 - first.e0
    if (
        parameters.element is None
        and parameters.reference_e0 is None
        and (abs(apart) > FOIL_FROM_SAMPLE_EV)
    ):
        notes.append(
            f"{where}: the reference channel's edge ({first.reference_e0:.1f} eV) is "
            f"{apart:+.0f} eV from the sample's ({first.e0:.1f} eV): a foil of another element, "
            "the energy is not calibrated; give its tabulated E0 with --set reference_e0=EV to "
            "calibrate"
        )
        return element, edge, None, notes
    given = parameters.reference_e0 is not None
    tabulated = parameters.reference_e0 if given else xas.tabulated_edge(element, edge or "K")
    if abs(tabulated - first.reference_e0) > 50:
        expected = "the reference_e0 given" if given else f"the tabulated {element} {edge} edge"
        raise ParameterError(
            f"{where}: the reference channel's edge is at {first.reference_e0:.1f} eV, "
            f"{tabulated - first.reference_e0:+.1f} eV from {expected} ({tabulated:.1f} eV): "
            f"wrong {'value' if given else 'element'}, or no foil in the reference channel; "
            f"set {'reference_e0' if given else 'element/edge'} or calibrate=false"
        )
    calibration = Calibration(element=element, edge=edge or "K", reference_e0=tabulated)
    return element, edge, calibration, notes


def make_spectroscopy_plan(
    input_path: str,
    parameters: xas.SpectroscopyParameters,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    settings: CalypsoSettings | None = None,
    workers: int = 1,
) -> SpectroscopyPlan:
    """Check the input and parameters and decide the work, before anything runs.

    Raises
    ------
    CalypsoError
        With a message naming the file, scan or parameter at fault.
    """
    settings = settings or CalypsoSettings()
    raw, raw_file, sources, stem = _resolve_sources(input_path, scans, parameters)
    first = check_source(sources[0], parameters)
    parameters = as_checked(parameters, first)
    others: list[str] = []
    for source in sources[1:]:
        # Text files are small: check each. Bliss scans share their layout: the first only.
        if source.scan is None:
            others.extend(check_source(source, parameters).notes)
    element, edge, calibration, notes = edge_and_calibration(
        parameters, first, sources[0].describe()
    )
    out = output_folder(input_path, raw, TECHNIQUE, output_dir, settings.processed_data)
    if raw is not None and raw_file is not None:
        raw = raw.model_copy(update={"sample_name": bliss.read_sample_name(raw_file)})
    require_registrable(input_path, raw, str(raw_file) if raw_file else None, settings)
    n_spectra = sum(source.n_spectra for source in sources)
    # mu, its normalised and flattened forms, chi(k) and chi(R) ... in float64, written twice
    # (part files, then the NeXus file): about 16 arrays of a spectrum's points each time.
    points = max(source.n_points for source in sources)
    require_output_room(out, 2 * 16 * 8 * points * n_spectra)
    return SpectroscopyPlan(
        input=input_path,
        raw=raw,
        raw_file=str(raw_file) if raw_file else None,
        sources=sources,
        parameters=parameters,
        calibration=calibration,
        element=element,
        edge=edge,
        output_dir=str(out),
        output_file=str(out / f"{stem}.h5"),
        batch_size=parameters.batch_size or default_batch_size(n_spectra, workers),
        notes=[*notes, *others],
    )
