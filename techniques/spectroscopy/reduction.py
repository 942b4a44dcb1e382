"""The whole reduction of a batch: calibrate, normalise and (optionally) extract the EXAFS."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from calypso.errors import RawDataError
from calypso.techniques.spectroscopy.absorption import batch_rows, check_spectrum
from calypso.techniques.spectroscopy.calibration import calibration_shift
from calypso.techniques.spectroscopy.exafs import ETOK, Exafs, Window, autobk
from calypso.techniques.spectroscopy.normalization import (
    MIN_EDGE_CONTRAST,
    Normalization,
    edge_contrast,
    find_e0,
    normalize,
)


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
        inside = (edges > e[:, 0]) & (edges < e[:, -1])
        contrast = np.zeros(rows.size)
        if inside.any():
            contrast[inside] = edge_contrast(e[inside], m[inside], edges[inside])
        no_edge[rows] = ~inside | (contrast < MIN_EDGE_CONTRAST)
        if exafs:
            reach = np.sqrt(ETOK * np.maximum(e[:, -1] - edges, 0.0))
            too_short[rows] = ~no_edge[rows] & (reach < 3.0)
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
    energy, mu = batch_rows(energy, mu)
    if skip_unusable and mu.shape[0] > 1:
        keywords = {
            "e0_smooth": e0_smooth, "pre1": pre1, "pre2": pre2, "norm1": norm1, "norm2": norm2,
            "nnorm": nnorm, "nvict": nvict, "exafs": exafs, "rbkg": rbkg, "nknots": nknots,
            "bkg_kmin": bkg_kmin, "bkg_kmax": bkg_kmax, "bkg_kweight": bkg_kweight,
            "bkg_dk": bkg_dk, "clamp_lo": clamp_lo, "clamp_hi": clamp_hi, "kweight": kweight,
            "kmin": kmin, "kmax": kmax, "dk": dk, "window": window, "rmax_out": rmax_out,
        }  # fmt: skip
        # Looked for only when the batch cannot be reduced whole: a batch that can is
        # reduced exactly as without the option, at no extra cost.
        arguments = {"mu_reference": mu_reference, "reference_e0": reference_e0, "e0": e0}
        try:
            return reduce_spectra(energy, mu, **arguments, where=where, **keywords)
        except RawDataError as error:
            masks = unusable_spectra(energy, mu, e0=e0, e0_smooth=e0_smooth, exafs=exafs)
            keep = ~np.logical_or.reduce(list(masks.values()))
            reasons = {reason: int(mask.sum()) for reason, mask in masks.items() if mask.any()}
            if keep.all():  # none to leave out: the batch's own error
                raise
            if not keep.any():
                raise NoSpectrumReducible(str(error), reasons) from None
        kept = reduce_spectra(
            energy[keep],
            mu[keep],
            mu_reference=None if mu_reference is None else mu_reference[keep],
            reference_e0=reference_e0,
            e0=e0[keep] if np.ndim(e0) == 1 else e0,
            where=where,
            **keywords,
        )
        return _with_skipped(kept, keep, energy, mu, reasons)
    check_spectrum(energy, mu, where)
    shift = np.zeros(mu.shape[0])
    if mu_reference is not None and reference_e0 is not None:
        shift = calibration_shift(energy, mu_reference, reference_e0, e0_smooth)
    calibrated = energy + shift[:, None]
    normalization = normalize(
        calibrated,
        mu,
        e0=e0,
        e0_smooth=e0_smooth,
        pre1=pre1,
        pre2=pre2,
        norm1=norm1,
        norm2=norm2,
        nnorm=nnorm,
        nvict=nvict,
        where=where,
    )
    chi = None
    if exafs:
        chi = autobk(
            calibrated,
            mu,
            normalization,
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
    return Reduction(energy=calibrated, mu=mu, shift=shift, normalization=normalization, exafs=chi)


def _with_skipped(
    kept: Reduction, keep: np.ndarray, energy: np.ndarray, mu: np.ndarray, reasons: dict
) -> Reduction:
    """``kept``, the reduction of the rows ``keep``, as that of the whole batch: the rows
    left out NaN (their measured energy and mu as they are)."""

    def rows(values: np.ndarray) -> np.ndarray:
        whole = np.full((keep.size, *values.shape[1:]), np.nan)
        whole[keep] = values
        return whole

    calibrated = np.array(energy, dtype=np.float64)
    calibrated[keep] = kept.energy
    norm = kept.normalization
    normalization = replace(
        norm,
        **{
            name: rows(getattr(norm, name))
            for name in (
                "e0", "edge_step", "pre_edge", "post_edge", "norm", "flat",
                "pre_coefficients", "post_coefficients", "edge_noise", "e0_spread",
            )
        },
    )  # fmt: skip
    chi = kept.exafs
    if chi is not None:
        chi = replace(
            chi,
            chi=rows(chi.chi),
            background=rows(chi.background),
            chir_magnitude=rows(chi.chir_magnitude),
        )
    return Reduction(
        energy=calibrated, mu=mu, shift=rows(kept.shift), normalization=normalization,
        exafs=chi, skipped=~keep, skip_reasons=reasons,
    )  # fmt: skip
