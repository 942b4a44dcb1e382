"""The spectroscopy flow's parameters: which counters make mu(E), the reduction, the batches."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from calypso.techniques.fields import TechniqueParameters
from calypso.techniques.spectroscopy.exafs import Window
from calypso.techniques.spectroscopy.normalization import MAX_NNORM


class SpectroscopySource(TechniqueParameters):
    """Which counters or columns make mu(E) and its energy axis, and how."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["auto", "transmission", "fluorescence", "mu"] = Field(
        "auto",
        description="How mu(E) is made: ln(I0/It), sum(fluorescence)/I0, or a mu column as is. "
        "'auto': transmission if It exists, else fluorescence, else a mu column.",
    )
    energy: str | None = Field(
        None,
        description="Energy counter or column (eV or keV); default: a usual name, else (text "
        "files) the column whose values are an energy or a mono angle.",
    )
    energy_unit: Literal["auto", "eV", "keV"] = Field(
        "auto", description="Unit of the energy column; 'auto': keV when all values are < 200."
    )
    mono_angle: str | None = Field(
        None, description="Monochromator Bragg angle counter (degrees), used when no energy."
    )
    d_spacing: float | None = Field(
        None,
        gt=0,
        description="Monochromator d-spacing (Å), to convert mono_angle to energy; default: "
        "the header's, for an angle column found by its values.",
    )
    i0: str | None = Field(None, description="Incident intensity counter.")
    it: str | None = Field(None, description="Transmitted intensity counter.")
    iref: str | None = Field(
        None, description="Intensity after the reference foil (for energy calibration)."
    )
    mu_column: str | None = Field(None, description="A column that already holds mu(E).")
    fluorescence: list[str] = Field(
        default_factory=list,
        description="Fluorescence channels to sum (names or glob patterns, e.g. 'fx_det*').",
    )
    icr: list[str] = Field(
        default_factory=list, description="Input count rates, one per channel (dead time)."
    )
    ocr: list[str] = Field(
        default_factory=list, description="Output count rates, one per channel (dead time)."
    )

    @model_validator(mode="after")
    def _check(self) -> SpectroscopySource:
        if (self.icr or self.ocr) and not (
            len(self.icr) == len(self.ocr) == len(self.fluorescence)
        ):
            raise ValueError(
                "icr and ocr need one entry per fluorescence channel "
                f"({len(self.fluorescence)} channels, {len(self.icr)} icr, {len(self.ocr)} ocr)"
            )
        if self.mono_angle and self.d_spacing is None:
            raise ValueError("mono_angle needs d_spacing (Å) to be converted to energy")
        return self


class SpectroscopyScience(TechniqueParameters):
    """Calibration, merging, normalisation and EXAFS, named as in Athena and Larch."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    calibrate: bool = Field(
        True, description="Shift the energy so the reference foil's E0 is its tabulated value."
    )
    element: str | None = Field(
        None, description="Absorbing element of the reference foil (default: guessed from E0)."
    )
    edge: str = Field(
        "K", description="Absorption edge of the reference foil: K, L1-L3, M1-M5, N1-N7 ..."
    )

    @field_validator("edge")
    @classmethod
    def _edge_name(cls, value: str) -> str:
        # Checked against the table only with an element; without one, 'Q' (or a typo)
        # was taken silently.
        name = value.strip().upper()
        if not re.fullmatch(r"K|L[1-3]|M[1-5]|N[1-7]|O[1-5]|P[1-3]", name):
            raise ValueError(
                f"{value!r} is no absorption edge: give K, L1, L2, L3, M1 ... M5, N1 ... N7"
            )
        return name

    reference_e0: float | None = Field(
        None, description="E0 of the reference foil (eV); default: tabulated (xraydb)."
    )
    merge: bool = Field(
        True,
        description="Merge repeated scans into one spectrum (normalised, weighted by 1/noise²).",
    )
    e0: float | None = Field(
        None, description="Edge energy (eV); default: maximum of the smoothed derivative."
    )
    e0_smooth: float = Field(
        0.5, ge=0, description="Gaussian width (eV) of the derivative smoothing used for E0."
    )
    pre1: float | None = Field(None, description="Start of the pre-edge line fit (eV from E0).")
    pre2: float | None = Field(None, description="End of the pre-edge line fit (eV from E0).")
    norm1: float | None = Field(None, description="Start of the post-edge fit (eV from E0).")
    norm2: float | None = Field(None, description="End of the post-edge fit (eV from E0).")
    nnorm: int | None = Field(
        None, ge=0, le=MAX_NNORM, description="Degree of the post-edge polynomial."
    )
    nvict: float = Field(0.0, description="Energy exponent of the pre-edge fit (Victoreen).")
    exafs: bool = Field(True, description="Compute chi(k) and |chi(R)|.")
    rbkg: float = Field(1.0, gt=0, description="R below which chi(R) is background (Å).")
    nknots: int | None = Field(None, ge=4, description="Spline knots (default: from rbkg).")
    bkg_kmin: float = Field(0.0, ge=0, description="Low k of the background fit (1/Å).")
    bkg_kmax: float | None = Field(None, gt=0, description="High k of the background fit.")
    bkg_kweight: float = Field(1.0, ge=0, description="k-weight of the background fit.")
    bkg_dk: float = Field(0.1, ge=0, description="Window taper of the background fit (1/Å).")
    clamp_lo: float = Field(0.0, ge=0, description="Weight holding chi(k) near 0 at low k.")
    clamp_hi: float = Field(1.0, ge=0, description="Weight holding chi(k) near 0 at high k.")
    kweight: float = Field(2.0, ge=0, description="k-weight of the Fourier transform.")
    kmin: float = Field(2.0, ge=0, description="Start of the Fourier transform window (1/Å).")
    kmax: float | None = Field(
        None, gt=0, description="End of the Fourier transform window (default: data end)."
    )
    dk: float = Field(1.0, ge=0, description="Window taper width (1/Å).")
    window: Window = Field("hanning", description="Fourier transform window.")
    rmax_out: float = Field(10.0, gt=0, description="Largest R written out (Å).")

    @model_validator(mode="after")
    def _k_ranges_in_order(self) -> SpectroscopyScience:
        # A window from 12 to 3 1/Å is empty: chi(R) would be zero everywhere.
        for low, high in (("kmin", "kmax"), ("bkg_kmin", "bkg_kmax")):
            first, last = getattr(self, low), getattr(self, high)
            if last is not None and first >= last:
                raise ValueError(f"{low}={first} is not below {high}={last} (1/Å)")
        return self


class SpectroscopyExecution(TechniqueParameters):
    """How the spectra are cut into tasks."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    batch_size: int | None = Field(
        None, ge=1, description="Spectra per task (default: chosen for ~1 s of work a task)."
    )


# pydantic orders the fields from the last base to the first: source, science, execution.
class SpectroscopyParameters(SpectroscopyExecution, SpectroscopyScience, SpectroscopySource):
    """Parameters of the spectroscopy (XAS) flow, named as in Athena and Larch.

    Column parameters name counters of a Bliss scan or columns of an XDI/ASCII
    file; ``None`` means "find it by its usual names" (see ``COLUMN_NAMES`` in
    the readers). Relative energies (``pre1`` ... ``norm2``) are in eV from E0;
    ``None`` picks Larch's defaults from the data range.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
