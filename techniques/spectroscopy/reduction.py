"""The whole reduction of a batch: calibrate, normalise and (optionally) extract the EXAFS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calypso.techniques.spectroscopy.absorption import batch_rows, check_spectrum
from calypso.techniques.spectroscopy.calibration import calibration_shift
from calypso.techniques.spectroscopy.exafs import Exafs, Window, autobk
from calypso.techniques.spectroscopy.normalization import Normalization, normalize


@dataclass(frozen=True)
class Reduction:
    """A batch reduced: calibrated energies, normalisation and (optionally) EXAFS."""

    energy: np.ndarray  # (n, m) calibrated
    mu: np.ndarray  # (n, m)
    shift: np.ndarray  # (n,) eV added to the energy by the calibration
    normalization: Normalization
    exafs: Exafs | None


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

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 501)
    >>> mu = 0.2 + 1.5 / (1 + np.exp(-(energy - 7112.0) / 2))
    >>> reduction = reduce_spectra(energy, mu, exafs=False)
    >>> reduction.normalization.e0.round(1), reduction.exafs
    (array([7112.]), None)
    """
    energy, mu = batch_rows(energy, mu)
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
