"""EXAFS: the AUTOBK background, chi(k) on a uniform k grid and its Fourier transform chi(R).

The background removal follows the AUTOBK idea (Newville et al., Phys. Rev. B 47,
14126, 1993): a spline mu0(k) with as many knots as the information content
below ``rbkg`` allows, chosen so that chi(k) = mu - mu0 has as little Fourier
amplitude below ``rbkg`` as possible. Because mu0 is linear in its spline
coefficients and the Fourier transform is linear, that is a linear least-squares
problem: one pseudo-inverse serves a whole batch of spectra on a common k grid.

k is in 1/Å, R in Å, energies in eV; names as in Larch (``rbkg``, ``kweight``,
``dk``, ``window`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import constants
from scipy.interpolate import BSpline

from calypso.errors import RawDataError
from calypso.techniques.spectroscopy.absorption import batch_rows
from calypso.techniques.spectroscopy.normalization import Normalization

#: k² = ETOK · (E - E0): 2 m_e / ħ² in 1/(eV Å²).
ETOK = 2 * constants.m_e * constants.e / constants.hbar**2 * 1e-20
#: Points of the zero-padded Fourier transform and the k step of the uniform k grid.
NFFT = 2048
KSTEP = 0.05
#: Spectra Fourier transformed at once (:func:`xftf`): ~8 MB of padded transform.
FT_ROWS = 256

Window = Literal["hanning", "sine", "welch"]


def ft_window(k: np.ndarray, kmin: float, kmax: float, dk: float, window: Window) -> np.ndarray:
    """Fourier transform window on ``k``: 1 inside [kmin, kmax], tapered over ``dk`` at each end.

    The taper is centred on kmin and kmax (the Ifeffit/Larch convention).
    """
    k = np.asarray(k, dtype=np.float64)
    if dk <= 0:
        return ((k >= kmin) & (k <= kmax)).astype(np.float64)
    rise = np.clip((k - (kmin - dk / 2)) / dk, 0.0, 1.0)
    fall = np.clip(((kmax + dk / 2) - k) / dk, 0.0, 1.0)
    ramp = np.minimum(rise, fall)
    if window == "hanning":
        return np.sin(np.pi / 2 * ramp) ** 2
    if window == "sine":
        return np.sin(np.pi / 2 * ramp)
    return 1.0 - (1.0 - ramp) ** 2  # welch


def k_grid(kmax: float) -> np.ndarray:
    return KSTEP * np.arange(int(1.01 + kmax / KSTEP))


def r_grid(rmax: float) -> np.ndarray:
    rstep = np.pi / (KSTEP * NFFT)
    return rstep * np.arange(int(rmax / rstep) + 1)


def xftf(
    k: np.ndarray,
    chi: np.ndarray,
    kweight: float,
    kmin: float,
    kmax: float,
    dk: float,
    window: Window = "hanning",
    rmax: float | None = None,
) -> np.ndarray:
    """Complex chi(R) of chi(k) on the uniform grid ``k`` (``KSTEP`` apart), row by row.

    chi(R) = KSTEP/sqrt(pi) · FFT[chi(k) k^kweight W(k)] zero-padded to ``NFFT``
    points; R steps by pi / (KSTEP · NFFT): ``r_grid(rmax)``, up to ``rmax`` (Å; default
    all ``NFFT // 2`` points).

    Rows are transformed ``FT_ROWS`` at a time: the padded transform of a whole batch
    would hold ~50 kB a spectrum at once (more than the batch's results), for the few
    hundred R points kept.

    Examples
    --------
    >>> k = k_grid(14.0)
    >>> chi = np.sin(2 * 2.5 * k) * np.exp(-0.01 * k**2)  # one shell at R = 2.5 Å
    >>> chir = xftf(k, chi, kweight=2, kmin=2.0, kmax=12.0, dk=1.0, rmax=6.0)
    >>> chir.shape, float(r_grid(6.0)[np.argmax(np.abs(chir[0]))]).__round__(1)
    ((1, 196), 2.5)
    """
    weight = k**kweight * ft_window(k, kmin, kmax, dk, window)
    chi = np.atleast_2d(chi)
    n_r = NFFT // 2 if rmax is None else r_grid(rmax).size
    chir = np.empty((chi.shape[0], n_r), dtype=np.complex128)
    for start in range(0, chi.shape[0], FT_ROWS):
        block = chi[start : start + FT_ROWS] * weight
        chir[start : start + FT_ROWS] = np.fft.rfft(block, n=NFFT, axis=-1)[:, :n_r]
    chir *= KSTEP / np.sqrt(np.pi)
    return chir


def spectrum_on_k(
    energy: np.ndarray, values: np.ndarray, e0: np.ndarray, k: np.ndarray
) -> np.ndarray:
    """``values`` (n, m) interpolated at E = E0 + k²/ETOK, row by row."""
    energy, values = batch_rows(energy, values)
    out = np.empty((values.shape[0], k.size))
    offsets = k**2 / ETOK
    for row in range(values.shape[0]):
        out[row] = np.interp(e0[row] + offsets, energy[row], values[row])
    return out


@dataclass(frozen=True)
class Exafs:
    """EXAFS of a batch: chi(k) on a common k grid and |chi(R)|."""

    k: np.ndarray  # (nk,)
    chi: np.ndarray  # (n, nk), in units of the edge step
    background: np.ndarray  # (n, m) mu0(E) in units of mu, NaN below E0
    r: np.ndarray  # (nr,)
    chir_magnitude: np.ndarray  # (n, nr)
    kmax: float
    nknots: int


@dataclass(frozen=True)
class BackgroundDesign:
    """The AUTOBK problem of a batch on its k grid, set up once: :func:`autobk` in steps, so
    a batch can be reduced a block of spectra at a time. Only the least-squares fit
    (:meth:`fit`, a matrix product whose rounding depends on how many spectra it is
    given) is made for the whole batch at once."""

    k: np.ndarray  # (nk,) 1/Å
    k_end: float
    basis: np.ndarray  # (nk, nknots) the spline basis on k
    operator: np.ndarray  # mu(k) -> the residual AUTOBK minimises
    solve: np.ndarray  # pseudo-inverse of operator @ basis

    def on_k(self, energy: np.ndarray, mu: np.ndarray, normalization: Normalization) -> np.ndarray:
        """mu(E) of rows minus their pre-edge line, in edge steps, on the k grid: (n, nk)."""
        energy, mu = batch_rows(energy, mu)
        scaled = (mu - normalization.pre_edge) / normalization.edge_step[:, None]
        return spectrum_on_k(energy, scaled, normalization.e0, self.k)

    def fit(self, mu_k: np.ndarray) -> np.ndarray:
        """The background on the k grid of every spectrum of the batch (``mu_k``, all rows)."""
        coefficients = self.solve @ (self.operator @ mu_k.T)  # (nknots, n)
        return (self.basis @ coefficients).T

    def exafs(
        self,
        energy: np.ndarray,
        e0: np.ndarray,
        edge_step: np.ndarray,
        pre_edge: np.ndarray,
        mu_k: np.ndarray,
        background_k: np.ndarray,
        *,
        kweight: float = 2.0,
        kmin: float = 2.0,
        kmax: float | None = None,
        dk: float = 1.0,
        window: Window = "hanning",
        rmax_out: float = 10.0,
    ) -> Exafs:
        """chi(k), the background on the energy grid and |chi(R)| of rows (their E0, edge
        step and pre-edge line as normalised), from their ``mu_k`` and the batch's fit
        ``background_k`` (those rows of it)."""
        energy = np.broadcast_to(energy, pre_edge.shape)
        k = self.k
        chi = mu_k - background_k
        background = np.full(energy.shape, np.nan)
        relative = energy - e0[:, None]
        for row in range(energy.shape[0]):
            above = relative[row] >= 0
            k_row = np.sqrt(ETOK * relative[row, above])
            values = np.interp(k_row, k, background_k[row], right=np.nan)
            background[row, above] = values * edge_step[row] + pre_edge[row, above]
        ft_kmax = min(kmax or self.k_end, self.k_end)
        chir = xftf(k, chi, kweight, kmin, ft_kmax, dk, window, rmax=rmax_out)
        return Exafs(
            k=k,
            chi=chi,
            background=background,
            r=r_grid(rmax_out),
            chir_magnitude=np.abs(chir),
            kmax=self.k_end,
            nknots=self.basis.shape[1],
        )


def background_design(
    kmax: float,
    *,
    rbkg: float = 1.0,
    nknots: int | None = None,
    bkg_kmin: float = 0.0,
    bkg_kweight: float = 1.0,
    bkg_dk: float = 0.1,
    window: Window = "hanning",
    clamp_lo: float = 0.0,
    clamp_hi: float = 1.0,
) -> BackgroundDesign:
    """The AUTOBK problem on the k grid up to ``kmax`` (parameters as :func:`autobk`'s): the
    spline basis on k and the linear map from mu(k) to the residual AUTOBK minimises."""
    k = k_grid(kmax)
    kmin = bkg_kmin
    rstep = np.pi / (KSTEP * NFFT)
    rbkg = max(rbkg, 2 * rstep)
    nknots = nknots or 1 + int(2 * rbkg * (kmax - kmin) / np.pi)
    nknots = max(5, min(128, nknots))
    # Cubic spline through nknots equally spaced points with not-a-knot ends:
    # the knot layout of AUTOBK, so the background is as stiff as Athena's.
    points = np.linspace(kmin, kmax, nknots)
    knots = np.concatenate([[kmin] * 4, points[2:-2], [kmax] * 4])
    basis = BSpline.design_matrix(np.clip(k, kmin, kmax), knots, 3).toarray()
    n_r = int(np.ceil(rbkg / rstep))
    weight = k**bkg_kweight * ft_window(k, kmin, kmax, bkg_dk, window)
    phase = np.exp(-2j * np.pi * np.outer(np.arange(n_r), np.arange(k.size)) / NFFT)
    transform = KSTEP / np.sqrt(np.pi) * phase * weight  # (n_r, nk): chi(k) -> chi(R < rbkg)
    rows = [transform.real, transform.imag]
    nclamp = 3
    for strength, index in (
        (clamp_lo, np.arange(nclamp)),
        (clamp_hi, np.arange(k.size - nclamp, k.size)),
    ):
        if strength > 0:
            clamp = np.zeros((nclamp, k.size))
            clamp[np.arange(nclamp), index] = 0.1 * strength
            rows.append(clamp)
    operator = np.vstack(rows)  # residual = operator @ (mu(k) - basis @ c)
    return BackgroundDesign(
        k=k, k_end=kmax, basis=basis, operator=operator, solve=np.linalg.pinv(operator @ basis)
    )


def autobk(
    energy: np.ndarray,
    mu: np.ndarray,
    normalization: Normalization,
    *,
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
) -> Exafs:
    """Remove the EXAFS background and Fourier transform chi(k), for a batch at once.

    All spectra of the batch share the k grid, up to the smallest k that every
    spectrum reaches (or ``bkg_kmax``). chi(k) is in units of the edge step.

    Parameters
    ----------
    energy : (m,) or (n, m) array
        Photon energy (eV), as normalised.
    mu : (n, m) array
        Absorption.
    normalization : Normalization
        Of ``mu`` (:func:`normalize`): E0, edge step and pre-edge line.
    rbkg : float
        R (Å) below which chi(R) is background.
    nknots : int, optional
        Spline knots; default: from ``rbkg`` and the k range (AUTOBK's count).
    bkg_kmin, bkg_kmax : float
        k range (1/Å) of the background fit; default end: the data's.
    bkg_kweight, bkg_dk : float
        k-weight and window taper (1/Å) of the background fit.
    clamp_lo, clamp_hi : float
        Weights holding chi(k) near 0 at the low and high k ends.
    kweight, kmin, kmax, dk : float
        k-weight, window range and taper (1/Å) of the Fourier transform; default
        ``kmax``: the end of the k grid.
    window : {'hanning', 'sine', 'welch'}
        Window shape, of the background fit and the Fourier transform.
    rmax_out : float
        Largest R (Å) kept in ``chir_magnitude``.
    where : str
        The spectra's source, for errors.

    Raises
    ------
    RawDataError
        When the spectrum reaches less than k = 3 1/Å above E0.

    Examples
    --------
    >>> energy = np.linspace(6900.0, 7900.0, 1001)
    >>> k = np.sqrt(ETOK * np.clip(energy - 7112.0, 0, None))
    >>> mu = 1 / (1 + np.exp(-(energy - 7112.0) / 2)) * (1 + 0.1 * np.sin(2 * 2.5 * k))
    >>> from calypso.techniques.spectroscopy import normalize
    >>> exafs = autobk(energy, mu, normalize(energy, mu, e0=7112.0))
    >>> float(exafs.r[np.argmax(exafs.chir_magnitude[0])]).__round__(1)  # the 2.5 Å shell
    2.5
    """
    energy, mu = batch_rows(energy, mu)
    design = background_design(
        exafs_k_end(energy[:, -1], normalization.e0, bkg_kmax, where),
        rbkg=rbkg,
        nknots=nknots,
        bkg_kmin=bkg_kmin,
        bkg_kweight=bkg_kweight,
        bkg_dk=bkg_dk,
        window=window,
        clamp_lo=clamp_lo,
        clamp_hi=clamp_hi,
    )
    mu_k = design.on_k(energy, mu, normalization)
    return design.exafs(
        energy,
        normalization.e0,
        normalization.edge_step,
        normalization.pre_edge,
        mu_k,
        design.fit(mu_k),
        kweight=kweight,
        kmin=kmin,
        kmax=kmax,
        dk=dk,
        window=window,
        rmax_out=rmax_out,
    )


#: A spectrum must reach this k (1/Å) above E0 for its EXAFS: below, it is a XANES scan.
MIN_EXAFS_K = 3.0


def exafs_k_end(
    energy_end: np.ndarray, e0: np.ndarray, bkg_kmax: float | None = None, where: str = "spectrum"
) -> float:
    """The end (1/Å) of a batch's k grid: the smallest k every spectrum reaches, or
    ``bkg_kmax``; ``energy_end`` is each spectrum's last energy (eV).

    Raises
    ------
    RawDataError
        When it is below k = 3 1/Å.
    """
    data_kmax = float(np.min(np.sqrt(ETOK * np.maximum(energy_end - e0, 0.0))))
    k_end = min(data_kmax, bkg_kmax or data_kmax)
    if k_end < MIN_EXAFS_K:
        raise RawDataError(
            f"{where}: the spectrum reaches only k = {k_end:.1f} 1/Å above E0: too short for "
            "EXAFS; "
            "set exafs=false for a XANES scan"
        )
    return k_end
