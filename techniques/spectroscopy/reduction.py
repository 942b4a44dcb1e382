"""The whole reduction of a batch: calibrate, normalise and (optionally) extract the EXAFS."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from calypso.errors import RawDataError
from calypso.techniques.spectroscopy.absorption import (
    BLOCK_ROWS,
    batch_rows,
    check_spectrum,
    row_blocks,
)
from calypso.techniques.spectroscopy.calibration import calibration_shift
from calypso.techniques.spectroscopy.edge import (
    MIN_POST_EDGE_EV,
    edge_contrast,
    find_e0,
    has_edge,
)
from calypso.techniques.spectroscopy.exafs import (
    ETOK,
    MIN_EXAFS_K,
    Exafs,
    Window,
    background_design,
    exafs_k_end,
)
from calypso.techniques.spectroscopy.normalization import Normalization, edge_frame, normalize


@dataclass(frozen=True)
class Reduction:
    """A batch reduced: calibrated energies, normalisation and (optionally) EXAFS."""

    energy: np.ndarray  # (n, m) calibrated
    mu: np.ndarray  # (n, m)
    shift: np.ndarray  # (n,) eV added to the energy by the calibration
    normalization: Normalization
    exafs: Exafs | None
    #: Spectra of a map left out (``skip_unusable``), their results NaN; None: none was.
    skipped: np.ndarray | None = None
    #: How many were left out, by reason (see :func:`unusable_spectra`).
    skip_reasons: dict[str, int] = field(default_factory=dict)


class NoSpectrumReducible(RawDataError):
    """None of a batch's spectra can be reduced (:func:`reduce_spectra` with
    ``skip_unusable``): the first one's error; ``reasons``, how many by reason."""

    def __init__(self, message: str, reasons: dict[str, int]) -> None:
        super().__init__(message)
        self.reasons = reasons


#: Why a spectrum of a map cannot be reduced (:func:`unusable_spectra`).
NOT_FINITE = "mu(E) not finite (I0 or It zero or negative)"
NO_EDGE = "no absorption edge in the scanned range"
TOO_SHORT = "too short above E0 for EXAFS (k < 3 1/Å)"


def unusable_spectra(
    energy: np.ndarray,
    mu: np.ndarray,
    *,
    e0: float | np.ndarray | None = None,
    e0_smooth: float = 0.5,
    exafs: bool = True,
) -> dict[str, np.ndarray]:
    """The spectra of a batch that cannot be reduced, by reason: mu(E) not finite, no
    absorption edge (E0 outside the scan, or no point :data:`MIN_EDGE_CONTRAST` times
    steeper than the rest), too short above E0 for the EXAFS. The pixels of a map off
    the sample, or where the beam was lost, are such spectra.

    Returns
    -------
    dict
        Reason -> (n,) boolean mask; a spectrum is in one reason only, the first found.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 501)
    >>> edge = 0.2 + 1.5 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> flat = np.random.default_rng(0).normal(1.0, 0.01, energy.size)
    >>> masks = unusable_spectra(energy, np.stack([edge, flat]), exafs=False)
    >>> {reason: mask.tolist() for reason, mask in masks.items() if mask.any()}
    {'no absorption edge in the scanned range': [False, True]}
    """
    energy, mu = batch_rows(energy, mu)
    n = mu.shape[0]
    not_finite = ~np.isfinite(mu).all(axis=1)
    no_edge, too_short = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    rows = np.flatnonzero(~not_finite)
    if rows.size:
        e, m = energy[rows], mu[rows]
        if e0 is None:
            edges = find_e0(e, m, e0_smooth)
        else:
            edges = np.broadcast_to(np.asarray(e0, dtype=np.float64), (n,))[rows]
        inside = (edges > e[:, 0]) & (edges < e[:, -1] - MIN_POST_EDGE_EV)
        contrast = np.zeros(rows.size)
        if inside.any():
            contrast[inside] = edge_contrast(e[inside], m[inside], edges[inside])
        edge = np.zeros(rows.size, dtype=bool)
        if inside.any():
            edge[inside] = has_edge(e[inside], m[inside], edges[inside], contrast[inside])
        no_edge[rows] = ~edge
        if exafs:
            reach = np.sqrt(ETOK * np.maximum(e[:, -1] - edges, 0.0))
            too_short[rows] = ~no_edge[rows] & (reach < MIN_EXAFS_K)
    return {NOT_FINITE: not_finite, NO_EDGE: no_edge, TOO_SHORT: too_short}


def reduce_spectra(
    energy: np.ndarray,
    mu: np.ndarray,
    *,
    mu_reference: np.ndarray | None = None,
    reference_e0: float | None = None,
    e0: float | np.ndarray | None = None,
    e0_smooth: float = 0.5,
    pre1: float | None = None,
    pre2: float | None = None,
    norm1: float | None = None,
    norm2: float | None = None,
    nnorm: int | None = None,
    nvict: float = 0.0,
    exafs: bool = True,
    rbkg: float = 1.0,
    nknots: int | None = None,
    bkg_kmin: float = 0.0,
    bkg_kmax: float | None = None,
    bkg_kweight: float = 1.0,
    bkg_dk: float = 0.1,
    clamp_lo: float = 0.0,
    clamp_hi: float = 1.0,
    kweight: float = 2.0,
    kmin: float = 2.0,
    kmax: float | None = None,
    dk: float = 1.0,
    window: Window = "hanning",
    rmax_out: float = 10.0,
    where: str = "spectrum",
    skip_unusable: bool = False,
) -> Reduction:
    """Calibrate, normalise and (if ``exafs``) extract chi(k) for a batch.

    Parameters
    ----------
    energy : (m,) or (n, m) array
        Energy (eV) as measured.
    mu : (n, m) array
        Absorption.
    mu_reference : (n, m) array, optional
        The reference foil's absorption; with ``reference_e0`` (eV) each
        spectrum's energy is shifted so the foil's E0 lands on ``reference_e0``.
    e0, e0_smooth, pre1, pre2, norm1, norm2, nnorm, nvict
        Of the normalisation: see :func:`normalize` (``e0_smooth`` serves the
        calibration's E0 too).
    exafs : bool
        Extract chi(k) and |chi(R)|.
    rbkg, nknots, bkg_kmin, bkg_kmax, bkg_kweight, bkg_dk, clamp_lo, clamp_hi
        Of the background: see :func:`autobk`.
    kweight, kmin, kmax, dk, window, rmax_out
        Of the Fourier transform: see :func:`autobk`.
    where : str
        Names the data in error messages.
    skip_unusable : bool
        For the spectra of a map: when the batch cannot be reduced whole, those that
        cannot be reduced (:func:`unusable_spectra`: off the sample, beam lost) are left
        out, their results NaN (``skipped``, ``skip_reasons``), and the others are reduced
        as a batch of them alone; none can: :class:`NoSpectrumReducible`. Without it
        such a spectrum is an error.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 501)
    >>> mu = 0.2 + 1.5 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> reduction = reduce_spectra(energy, mu, exafs=False)
    >>> reduction.normalization.e0.round(1), reduction.exafs
    (array([7112.]), None)
    """
    batch = BatchReduction(
        energy,
        mu,
        mu_reference=mu_reference,
        reference_e0=reference_e0,
        e0=e0,
        e0_smooth=e0_smooth,
        exafs=exafs,
        where=where,
        skip_unusable=skip_unusable,
        pre1=pre1,
        pre2=pre2,
        norm1=norm1,
        norm2=norm2,
        nnorm=nnorm,
        nvict=nvict,
        rbkg=rbkg,
        nknots=nknots,
        bkg_kmin=bkg_kmin,
        bkg_kmax=bkg_kmax,
        bkg_kweight=bkg_kweight,
        bkg_dk=bkg_dk,
        clamp_lo=clamp_lo,
        clamp_hi=clamp_hi,
        kweight=kweight,
        kmin=kmin,
        kmax=kmax,
        dk=dk,
        window=window,
        rmax_out=rmax_out,
    )
    return batch.whole()


_FRAME = ("pre1", "pre2", "norm1", "norm2", "nnorm")
_DESIGN = ("rbkg", "nknots", "bkg_kmin", "bkg_kweight", "bkg_dk", "window", "clamp_lo", "clamp_hi")
_TRANSFORM = ("kweight", "kmin", "kmax", "dk", "window", "rmax_out")


class BatchReduction:
    """The reduction of a batch of spectra (:func:`reduce_spectra`), a block at a time.

    What the batch's spectra share is decided over all of them when it is made, as
    :func:`reduce_spectra` decides it: the checks, each one's calibration and E0, the fit
    ranges (of the spectrum nearest the median E0), the k grid (up to the smallest k
    every spectrum reaches) and, with ``skip_unusable``, the spectra left out (raising
    what :func:`reduce_spectra` raises). Then :meth:`normalized` gives the normalisation
    of ``rows`` spectra at a time and, after it, :meth:`exafs` their EXAFS. Besides the
    inputs, what is held is a block's arrays and the batch's mu(k), its pre-edge lines
    and their background fit (one matrix product for the whole batch, as its rounding
    depends on how many spectra it is given): ~20 kB a spectrum instead of ~64. The
    numbers are :func:`reduce_spectra`'s, bit for bit: the rest of the arithmetic is row
    by row (:func:`~calypso.techniques.spectroscopy.absorption.row_blocks`).

    Parameters
    ----------
    energy, mu, mu_reference, reference_e0, e0, e0_smooth, exafs, where, skip_unusable
        As :func:`reduce_spectra`'s.
    **options
        The other keywords of :func:`reduce_spectra` (``pre1`` ... ``rmax_out``).

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 501)
    >>> mu = 0.2 + 1.5 / (1 + np.exp(-(energy - np.array([[7111.0], [7112.0], [7113.0]])) / 2))
    >>> batch = BatchReduction(energy, mu, exafs=False)
    >>> [(rows.start, block.normalization.e0.round(1)) for rows, block in batch.normalized(2)]
    [(0, array([7111., 7112.])), (2, array([7113.]))]
    """

    def __init__(
        self,
        energy: np.ndarray,
        mu: np.ndarray,
        *,
        mu_reference: np.ndarray | None = None,
        reference_e0: float | None = None,
        e0: float | np.ndarray | None = None,
        e0_smooth: float = 0.5,
        exafs: bool = True,
        where: str = "spectrum",
        skip_unusable: bool = False,
        **options,
    ) -> None:
        unknown = set(options) - {*_FRAME, *_DESIGN, *_TRANSFORM, "nvict", "bkg_kmax"}
        if unknown:
            raise TypeError(f"BatchReduction: unknown keywords {sorted(unknown)}")
        self.energy, self.mu = batch_rows(energy, mu)
        self.where = where
        self.e0_smooth = e0_smooth
        self.options = options
        #: The spectra reduced (``skip_unusable``); None: all of them.
        self.keep: np.ndarray | None = None
        self.skip_reasons: dict[str, int] = {}
        self._mu_k: np.ndarray | None = None
        arguments = (mu_reference, reference_e0, e0, exafs)
        if not (skip_unusable and self.mu.shape[0] > 1):
            self._decide(None, *arguments)
            return
        # Looked for only when the batch cannot be reduced whole: a batch that can is
        # reduced exactly as without the option, at no extra cost.
        try:
            self._decide(None, *arguments)
        except RawDataError as error:
            masks = unusable_spectra(self.energy, self.mu, e0=e0, e0_smooth=e0_smooth, exafs=exafs)
            keep = ~np.logical_or.reduce(list(masks.values()))
            reasons = {reason: int(mask.sum()) for reason, mask in masks.items() if mask.any()}
            if keep.all():  # none to leave out: the batch's own error
                raise
            if not keep.any():
                raise NoSpectrumReducible(str(error), reasons) from None
            self.keep, self.skip_reasons = keep, reasons
            self._decide(keep, *arguments)

    def _decide(
        self,
        keep: np.ndarray | None,
        mu_reference: np.ndarray | None,
        reference_e0: float | None,
        e0: float | np.ndarray | None,
        exafs: bool,
    ) -> None:
        """What the spectra ``keep`` (None: all) share; raises where they cannot be reduced."""
        energy, mu = self._kept(slice(None), keep)
        check_spectrum(energy, mu, self.where)
        self.shift = np.zeros(mu.shape[0])
        if mu_reference is not None and reference_e0 is not None:
            reference = mu_reference if keep is None else mu_reference[keep]
            self.shift = calibration_shift(energy, reference, reference_e0, self.e0_smooth)
        calibrated = energy + self.shift[:, None]
        frame = {name: self.options[name] for name in _FRAME if name in self.options}
        self.edges = edge_frame(
            calibrated,
            mu,
            e0=e0[keep] if keep is not None and np.ndim(e0) == 1 else e0,
            e0_smooth=self.e0_smooth,
            where=self.where,
            **frame,
        )
        self.design = None
        if exafs:
            design = {name: self.options[name] for name in _DESIGN if name in self.options}
            k_end = exafs_k_end(
                calibrated[:, -1], self.edges.e0, self.options.get("bkg_kmax"), self.where
            )
            self.design = background_design(k_end, **design)
        # Where each block's spectra are among those reduced.
        counted = np.ones(self.mu.shape[0], dtype=bool) if keep is None else keep
        self._position = np.concatenate([[0], np.cumsum(counted)])

    def _kept(self, rows: slice, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if keep is None:
            return self.energy[rows], self.mu[rows]
        inside = keep[rows]
        return self.energy[rows][inside], self.mu[rows][inside]

    def _reduced(self, rows: slice) -> slice:
        """Where the batch's ``rows`` are among the spectra reduced."""
        return slice(int(self._position[rows.start]), int(self._position[rows.stop]))

    def normalized(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[slice, Reduction]]:
        """The batch normalised ``rows`` spectra at a time: (their rows in the batch, their
        reduction without the EXAFS; those left out NaN)."""
        n, m = self.mu.shape
        reduced = int(self._position[-1])
        if self.design is not None:
            self._mu_k = np.empty((reduced, self.design.k.size))
            self._edge_step = np.empty(reduced)
            self._pre_edge = np.empty((reduced, m))
        nvict = self.options.get("nvict", 0.0)
        for block in row_blocks(n, rows):
            inside = self._reduced(block)
            energy, mu = self._kept(block, self.keep)
            calibrated = energy + self.shift[inside, None]
            normalization = normalize(
                calibrated, mu, nvict=nvict, where=self.where, frame=self.edges.rows(inside)
            )
            if self._mu_k is not None:
                self._mu_k[inside] = self.design.on_k(calibrated, mu, normalization)
                self._edge_step[inside] = normalization.edge_step
                self._pre_edge[inside] = normalization.pre_edge
            reduction = Reduction(
                energy=calibrated,
                mu=mu,
                shift=self.shift[inside],
                normalization=normalization,
                exafs=None,
                skip_reasons=self.skip_reasons,
            )
            yield block, self._in_batch_rows(block, reduction)

    def exafs(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[slice, Exafs]]:
        """The batch's EXAFS ``rows`` spectra at a time, once :meth:`normalized` has gone
        through it: (their rows in the batch, their EXAFS; those left out NaN)."""
        if self.design is None or self._mu_k is None:
            raise RuntimeError("BatchReduction.exafs: normalized() first, and with exafs=True")
        background_k = self.design.fit(self._mu_k)
        transform = {name: self.options[name] for name in _TRANSFORM if name in self.options}
        for block in row_blocks(self.mu.shape[0], rows):
            inside = self._reduced(block)
            energy, _ = self._kept(block, self.keep)
            exafs = self.design.exafs(
                energy + self.shift[inside, None],
                self.edges.e0[inside],
                self._edge_step[inside],
                self._pre_edge[inside],
                self._mu_k[inside],
                background_k[inside],
                **transform,
            )
            if self.keep is not None:
                keep = self.keep[block]
                exafs = replace(
                    exafs,
                    chi=_in_rows(keep, exafs.chi),
                    background=_in_rows(keep, exafs.background),
                    chir_magnitude=_in_rows(keep, exafs.chir_magnitude),
                )
            yield block, exafs
        self._mu_k = self._edge_step = self._pre_edge = None

    def whole(self) -> Reduction:
        """The batch reduced in one block: :func:`reduce_spectra`'s result."""
        n = self.mu.shape[0]
        ((_, reduction),) = self.normalized(rows=n)
        if self.design is not None:
            ((_, exafs),) = self.exafs(rows=n)
            reduction = replace(reduction, exafs=exafs)
        return reduction

    def _in_batch_rows(self, block: slice, reduction: Reduction) -> Reduction:
        """A block's reduction with the rows left out (``skip_unusable``) put back, NaN; their
        measured energy and mu as they are."""
        if self.keep is None:
            return reduction
        keep = self.keep[block]
        calibrated = np.array(self.energy[block], dtype=np.float64)
        calibrated[keep] = reduction.energy
        norm = reduction.normalization
        normalization = replace(
            norm,
            **{
                name: _in_rows(keep, getattr(norm, name))
                for name in (
                    "e0", "edge_step", "pre_edge", "post_edge", "norm", "flat",
                    "pre_coefficients", "post_coefficients", "edge_noise", "e0_spread",
                )
            },
        )  # fmt: skip
        return replace(
            reduction,
            energy=calibrated,
            mu=self.mu[block],
            shift=_in_rows(keep, reduction.shift),
            normalization=normalization,
            skipped=~keep,
        )


def _in_rows(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` of the rows ``keep`` in rows of all, the others NaN."""
    whole = np.full((keep.size, *values.shape[1:]), np.nan)
    whole[keep] = values
    return whole
