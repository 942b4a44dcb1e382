"""Planning a spectroscopy run: which spectra, which calibration, which batches.

Runs before Prefect or Dask start, so bad input fails in a second: each source
is read (one spectrum of it), turned into mu(E) and normalised once, which
finds a missing column, a non-monotonic energy, an all-zero I0 or a scan that
misses the edge before any work is submitted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.preflight import require_output_room, require_registrable
from calypso.tasks.raw import bliss
from calypso.tasks.raw.absorption import absorption
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


def default_batch_size(n_spectra: int, workers: int) -> int:
    # ~0.1 ms a spectrum: 5000 spectra are ~0.5 s of work, enough to hide
    # Prefect's ~60 ms a task; still at least two batches a worker.
    size = math.ceil(n_spectra / (2 * max(workers, 1)))
    return max(min(size, 5000), 200)


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
            texts = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
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


def check_source(
    source: SpectrumSource, parameters: xas.SpectroscopyParameters
) -> tuple[float, float | None, dict[str, str]]:
    """Read and normalise the first spectrum of ``source``: its E0, reference E0 and metadata.
    A map's first pixel may be off the sample (its spectrum has no edge): then the first of
    :data:`MAP_SPECTRA_TRIED` spectra spread over the map that can be reduced; none of them,
    the first one's error."""
    where = source.describe()
    try:
        return check_first_spectrum(read_source(source, 0, 1), where, parameters)
    except RawDataError as first_error:
        if source.n_spectra < 2:
            raise
        tried = np.unique(np.linspace(1, source.n_spectra - 1, MAP_SPECTRA_TRIED - 1).astype(int))
        for index in tried:
            table = read_source(source, index, index + 1)
            try:
                return check_first_spectrum(table, where, parameters)
            except RawDataError:
                continue
        raise RawDataError(
            f"{first_error} ({tried.size} other spectra spread over the map cannot be reduced "
            "either)"
        ) from None


def check_first_spectrum(
    table: Any, where: str, parameters: xas.SpectroscopyParameters
) -> tuple[float, float | None, dict[str, str]]:
    """Normalise the first spectrum of ``table`` (read offline, or from a growing file by a
    live run) that can be reduced: its E0, reference E0 and metadata. None can: the first
    one's error, naming ``where``."""
    data = absorption(table, parameters)
    first_error: RawDataError | None = None
    for row in range(data.mu.shape[0]):
        try:
            return _check_spectrum_row(data, row, where, parameters)
        except RawDataError as exc:
            first_error = first_error or exc
    assert first_error is not None  # a table holds a spectrum at least
    raise first_error


def _check_spectrum_row(
    data: Any, row: int, where: str, parameters: xas.SpectroscopyParameters
) -> tuple[float, float | None, dict[str, str]]:
    energy = np.atleast_2d(data.energy)
    energy = energy[row : row + 1] if energy.shape[0] > 1 else energy
    mu = data.mu[row : row + 1]
    xas.check_spectrum(energy, mu, where)
    normalization = xas.normalize(energy, mu, **normalization_keywords(parameters), where=where)
    reference_e0 = None
    if data.mu_reference is not None:
        reference = data.mu_reference[row : row + 1]
        reference_e0 = float(xas.find_e0(energy, reference, parameters.e0_smooth)[0])
    if parameters.exafs:
        xas.autobk(energy, mu, normalization, **exafs_keywords(parameters))
    return float(normalization.e0[0]), reference_e0, data.metadata


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
    e0 = reference_e0 = None
    metadata: dict[str, str] = {}
    for index, source in enumerate(sources):
        # Text files are small: check each. Bliss scans share their layout: check the first.
        if index == 0 or source.scan is None:
            found_e0, found_reference, found_metadata = check_source(source, parameters)
            if index == 0:
                e0, reference_e0, metadata = found_e0, found_reference, found_metadata
    element = parameters.element or metadata.get("Element.symbol")
    edge = parameters.edge if parameters.element else metadata.get("Element.edge", parameters.edge)
    if element is None and e0 is not None:
        element, edge = xas.guess_edge(e0)
    calibration = None
    if parameters.calibrate and reference_e0 is not None:
        foil_element, foil_edge = element, edge
        if parameters.reference_e0 is not None:
            tabulated = parameters.reference_e0
        else:
            if foil_element is None:
                foil_element, foil_edge = xas.guess_edge(reference_e0)
            tabulated = xas.tabulated_edge(foil_element, foil_edge or "K")
        if abs(tabulated - reference_e0) > 50:
            raise ParameterError(
                f"{sources[0].describe()}: the reference channel's edge is at "
                f"{reference_e0:.1f} eV, {tabulated - reference_e0:+.1f} eV from the tabulated "
                f"{foil_element} {foil_edge} edge ({tabulated:.1f} eV): wrong element, or no "
                "foil in the reference channel; set element/edge or calibrate=false"
            )
        calibration = Calibration(
            element=foil_element or "", edge=foil_edge or "K", reference_e0=tabulated
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
    )
