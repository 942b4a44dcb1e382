"""Azimuthal integration of powder diffraction frames with pyFAI.

Arrays in, arrays out. Parameters carry pyFAI's own names (``npt``, ``unit``,
``method``, ``error_model``, ``polarization_factor``, ``npt_azim`` ...) so a
pyFAI user recognises them. The expensive object, the azimuthal integrator with
its sparse matrix, is cached explicitly by
:class:`~calypso.techniques.integrator_cache.IntegratorCache`, keyed by
the geometry and lent to one thread at a time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pyFAI import units as pyfai_units
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from calypso.errors import ParameterError
from calypso.techniques.fields import TechniqueParameters
from calypso.techniques.masks import DEFAULT_MIN_UNMASKED_FRACTION

Flip = Literal["ud", "lr", "udlr"]
ErrorModel = Literal["poisson", "azimuthal", "hybrid"]


class Geometry(BaseModel):
    """Experiment geometry in pyFAI's PONI convention (metres and radians); only a physical
    one (positive distance and wavelength, every value finite) is accepted. Old PONI files
    carry no wavelength: such a geometry integrates in 2θ or r, not in q or d."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dist: float = Field(..., gt=0, description="Sample-detector distance (m).")
    poni1: float = Field(..., description="Point of normal incidence, slow axis (m).")
    poni2: float = Field(..., description="Point of normal incidence, fast axis (m).")
    rot1: float = Field(0.0, description="Rotation 1 (rad).")
    rot2: float = Field(0.0, description="Rotation 2 (rad).")
    rot3: float = Field(0.0, description="Rotation 3 (rad).")
    wavelength: float | None = Field(
        None,
        gt=0,
        description="X-ray wavelength (m); None: only for units without it (2th_deg, r_mm).",
    )
    detector: str = Field("Detector", description="pyFAI detector name.")
    detector_config: dict[str, Any] = Field(
        default_factory=dict, description="pyFAI detector configuration (e.g. pixel1, pixel2)."
    )
    parallax: bool = Field(False, description="pyFAI parallax correction.")

    def as_pyfai_config(self) -> dict[str, Any]:
        return {"poni_version": 2.1, **self.model_dump()}

    def key(self) -> str:
        """A stable string identifying this geometry (for caches)."""
        return json.dumps(self.model_dump(), sort_keys=True)


class DiffractionSource(TechniqueParameters):
    """Where the frames and their companions are: the detector, the monitor, the files read."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    poni: str | None = Field(
        None,
        description="pyFAI PONI file with the calibrated geometry.",
        json_schema_extra={"path": "file"},
    )
    detector: str | None = Field(
        None, description="Detector in the Bliss scan (default: the only 2D detector)."
    )
    mask: str | None = Field(
        None,
        description="Mask image (non-zero = masked), any fabio format.",
        json_schema_extra={"path": "file"},
    )
    min_unmasked_fraction: float = Field(
        DEFAULT_MIN_UNMASKED_FRACTION,
        ge=0,
        le=1,
        description="Refuse a mask that leaves fewer of the detector's pixels than this "
        "fraction (0: any mask)",
    )
    dark: str | None = Field(
        None, description="Dark current image.", json_schema_extra={"path": "file"}
    )
    flat: str | None = Field(
        None, description="Flat field image.", json_schema_extra={"path": "file"}
    )
    monitor: str | None = Field(
        None, description="Counter that normalises each frame (e.g. 'mon'); None: no normalisation."
    )


class DiffractionScience(TechniqueParameters):
    """How a frame becomes a pattern: geometry, bins, corrections and errors, in pyFAI's names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    geometry: Geometry | None = Field(None, description="The geometry itself, instead of a PONI.")
    npt: int = Field(1000, ge=2, le=100_000, description="Number of radial bins.")
    npt_azim: int | None = Field(
        None, ge=1, le=36_000, description="Azimuthal bins: set it for 2D (cake) integration."
    )
    unit: str = Field("q_nm^-1", description="Radial unit: q_nm^-1, q_A^-1, 2th_deg, r_mm ...")
    method: tuple[str, str, str] = Field(
        ("bbox", "csr", "cython"),
        description="pyFAI method: (splitting, algorithm, implementation).",
    )
    error_model: ErrorModel | None = Field(
        "poisson", description="How pyFAI estimates errors (None: no errors)."
    )
    polarization_factor: float | None = Field(
        None, ge=-1, le=1, description="Polarisation factor (-1..1); None: no correction."
    )
    correct_solid_angle: bool = Field(True, description="Correct for the pixels' solid angle.")
    radial_range: tuple[float, float] | None = Field(None, description="Radial range, in `unit`.")
    azimuth_range: tuple[float, float] | None = Field(None, description="Azimuthal range (deg).")
    dummy: float | None = Field(None, description="Value of invalid pixels (dynamic mask).")
    delta_dummy: float | None = Field(None, description="Tolerance on `dummy`.")
    monitor_reference: float = Field(
        1.0, gt=0, description="Monitor value at which intensities are reported unscaled."
    )
    flip: Flip | None = Field(
        None, description="Flip frames before integration: 'ud' (up-down), 'lr' or 'udlr'."
    )
    rotate: Literal[0, 90, 180, 270] = Field(
        0, description="Rotate frames counter-clockwise by this many degrees, after the flip."
    )

    @field_validator("method", mode="before")
    @classmethod
    def _split_method(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p for p in value.replace(",", "_").replace(" ", "_").split("_") if p]
            if len(parts) == 1:
                return ("bbox", parts[0], "cython")
            return tuple(parts)
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: tuple[str, str, str]) -> tuple[str, str, str]:
        from pyFAI.method_registry import Method

        try:  # pyFAI's own check of each part's name, and its message
            method = Method(1, *(part.lower() for part in value), None)
        except ValueError as exc:
            raise ValueError(f"pyFAI has no method {list(value)} here: {exc}") from None
        return (method.split, method.algo, method.impl)

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str) -> str:
        if value not in pyfai_units.RADIAL_UNITS:
            known = ", ".join(u for u in pyfai_units.RADIAL_UNITS if "(" not in u)
            raise ValueError(f"unknown radial unit {value!r}; pyFAI knows {known}")
        return value

    @field_validator("error_model", mode="before")
    @classmethod
    def _none_error_model(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("none", ""):
            return None
        if isinstance(value, str) and value not in get_args(ErrorModel):
            known = ", ".join(repr(name) for name in (*get_args(ErrorModel), "none"))
            raise ValueError(f"unknown error model {value!r}: give one of {known}")
        return value

    @field_validator("radial_range", "azimuth_range")
    @classmethod
    def _ordered_range(
        cls, value: tuple[float, float] | None, info: ValidationInfo
    ) -> tuple[float, float] | None:
        # Once taken silently: a reversed range (pyFAI swaps it) and an azimuth range
        # beyond a turn, whose bins outside the detector's chi are empty.
        if value is None:
            return None
        low, high = value
        if not low < high:
            raise ValueError(f"[{low:g}, {high:g}]: the first bound must be below the second")
        if info.field_name == "azimuth_range" and (low < -360 or high > 360 or high - low > 360):
            raise ValueError(
                f"[{low:g}, {high:g}] degrees: an azimuth range lies within one turn, "
                "between -180 and 180 or 0 and 360"
            )
        return value


class DiffractionExecution(TechniqueParameters):
    """How the work is cut into tasks."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    chunk_size: int | None = Field(
        None, ge=1, description="Frames per task (default: chosen from the dataset size)."
    )


# pydantic orders the fields from the last base to the first: source, science, execution.
class DiffractionParameters(DiffractionExecution, DiffractionScience, DiffractionSource):
    """Parameters of the diffraction (azimuthal integration) flow.

    Names follow pyFAI wherever pyFAI has one. File-valued parameters (``poni``,
    ``mask``, ``dark``, ``flat``) are paths read by the flow's tasks; ``mask``,
    ``dark`` and ``flat`` are in the detector's raw orientation, like the frames,
    and are re-oriented with them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="after")
    def _one_geometry(self) -> DiffractionParameters:
        if self.poni is not None and self.geometry is not None:
            raise ValueError("give either 'poni' or 'geometry', not both")
        return self


def orient(frames: np.ndarray, flip: Flip | None = None, rotate: int = 0) -> np.ndarray:
    """Flip then rotate images (the last two axes) as the calibration expects.

    Parameters
    ----------
    frames : ndarray, shape (..., rows, columns)
        One image or a stack of images.
    flip : {'ud', 'lr', 'udlr'} or None
        'ud' reverses the rows, 'lr' the columns.
    rotate : {0, 90, 180, 270}
        Counter-clockwise rotation in degrees, applied after the flip.

    Returns
    -------
    ndarray
        A view when possible; the same array when nothing is asked.
    """
    out = frames
    if flip in ("ud", "udlr"):
        out = out[..., ::-1, :]
    if flip in ("lr", "udlr"):
        out = out[..., :, ::-1]
    if rotate:
        out = np.rot90(out, k=rotate // 90, axes=(-2, -1))
    return out


def oriented_shape(shape: tuple[int, ...], rotate: int) -> tuple[int, ...]:
    """Shape of an image of ``shape`` after :func:`orient` with ``rotate``."""
    if rotate in (90, 270):
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def needs_wavelength(unit: str) -> bool:
    """Whether pyFAI's radial ``unit`` is computed from the wavelength (q, d), or not
    (2θ, r).

    Examples
    --------
    >>> needs_wavelength("q_nm^-1"), needs_wavelength("2th_deg")
    (True, False)
    """
    return "λ" in (pyfai_units.to_unit(unit).formula or "")


def detector_shape(geometry: Geometry) -> tuple[int, int] | None:
    """The shape of the frames ``geometry``'s detector gives, in pixels (None: a
    generic detector of any size)."""
    from pyFAI.detectors import detector_factory

    try:
        detector = detector_factory(geometry.detector, geometry.detector_config or None)
    except Exception as exc:
        raise ParameterError(
            f"pyFAI does not know the detector {geometry.detector}: {exc}"
        ) from None
    shape = detector.shape or detector.max_shape
    return (int(shape[0]), int(shape[1])) if shape is not None else None


def make_integrator(geometry: Geometry) -> AzimuthalIntegrator:
    """Build a pyFAI azimuthal integrator for ``geometry``."""
    try:
        return AzimuthalIntegrator().set_config(geometry.as_pyfai_config())
    except Exception as exc:
        raise ParameterError(f"pyFAI rejects the geometry {geometry.model_dump()}: {exc}") from exc


# pyFAI computes pixel positions with numexpr programs compiled once per unit and shared by
# every integrator of the process; one program run by two threads at once corrupts the heap
# (numexpr 2.14 running serially: OMP_NUM_THREADS=1, or small arrays), even with an
# integrator each. So one thread at a time sets an integrator up, or asks it for positions:
# integrate_frames holds this lock for its first frame, and callers of
# ``array_from_unit`` and the like hold it too. Integrating the later frames needs no lock.
SETUP_LOCK = threading.Lock()


@dataclass(frozen=True)
class IntegratedFrames:
    """Result of integrating a stack of frames.

    ``intensity`` and ``errors`` have shape (frames, npt) in 1D and
    (frames, npt_azim, npt) in 2D; ``errors`` is None without an error model.
    """

    radial: np.ndarray
    radial_unit: str
    intensity: np.ndarray
    errors: np.ndarray | None
    azimuthal: np.ndarray | None = None


def radial_axis_name(unit: str) -> tuple[str, str]:
    """NeXus name and units of the radial axis for a pyFAI unit, e.g. ('q', 'nm^-1'),
    ('2th', 'deg'): pyFAI's own names, which pyFAI's and ewoksxrpd's readers look for."""
    name, _, units = str(pyfai_units.to_unit(unit)).partition("_")
    return name, units or ""


def integrate_frames(
    frames: Iterable[np.ndarray],
    integrator: AzimuthalIntegrator,
    *,
    npt: int = 1000,
    npt_azim: int | None = None,
    unit: str = "q_nm^-1",
    method: tuple[str, str, str] = ("bbox", "csr", "cython"),
    error_model: ErrorModel | None = "poisson",
    polarization_factor: float | None = None,
    correct_solid_angle: bool = True,
    radial_range: tuple[float, float] | None = None,
    azimuth_range: tuple[float, float] | None = None,
    dummy: float | None = None,
    delta_dummy: float | None = None,
    flip: Flip | None = None,
    rotate: int = 0,
    mask: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    monitor: np.ndarray | None = None,
    monitor_reference: float = 1.0,
    monitor_name: str | None = None,
) -> IntegratedFrames:
    """Integrate each frame of a stack with pyFAI.

    The keywords are pyFAI's (``integrate1d``/``integrate2d_ng``) and those of
    :class:`DiffractionParameters`, with the same defaults.

    Parameters
    ----------
    frames : ndarray of shape (n, rows, columns), or an iterable of 2D frames
        Raw frames in the detector's orientation. An iterable is consumed one
        frame at a time, so frames can be streamed from a file.
    integrator : AzimuthalIntegrator
        Reused across calls, by one thread at a time (see
        :class:`~calypso.techniques.integrator_cache.IntegratorCache`).
    npt : int
        Radial bins.
    npt_azim : int, optional
        Azimuthal bins; given, the integration is 2D (a cake).
    unit : str
        Radial unit in pyFAI's names (``q_nm^-1``, ``2th_deg``, ``r_mm`` ...).
    method : (str, str, str)
        pyFAI's (splitting, algorithm, implementation).
    error_model : {'poisson', 'azimuthal', 'hybrid'} or None
        How pyFAI estimates the errors; None: no errors.
    polarization_factor : float, optional
        -1 to 1; None: no polarisation correction.
    correct_solid_angle : bool
        Correct for each pixel's solid angle.
    radial_range : (float, float), optional
        In ``unit``.
    azimuth_range : (float, float), optional
        Degrees.
    dummy, delta_dummy : float, optional
        Value (and tolerance) of the pixels to ignore.
    flip : {'ud', 'lr', 'udlr'} or None
    rotate : {0, 90, 180, 270}
        Applied (see :func:`orient`) to frames, mask, dark and flat alike.
    mask, dark, flat : ndarray, optional
        Images of one frame's shape, in the raw orientation.
    monitor : ndarray, shape (n,), optional
        Monitor counts; intensities are divided by ``monitor / monitor_reference``.
    monitor_reference : float
        Monitor value at which intensities are unscaled.
    monitor_name : str, optional
        The monitor's counter, named in error messages.

    Returns
    -------
    IntegratedFrames

    Examples
    --------
    >>> geometry = Geometry(dist=0.1, poni1=0.01, poni2=0.01, wavelength=1e-10,
    ...                     detector_config={"pixel1": 1e-4, "pixel2": 1e-4})
    >>> frames = np.ones((2, 200, 200), dtype=np.float32)
    >>> result = integrate_frames(frames, make_integrator(geometry), npt=100, unit="2th_deg")
    >>> result.intensity.shape
    (2, 100)
    """
    prepared: dict[str, np.ndarray | None] = {}
    for name, image in (("mask", mask), ("dark", dark), ("flat", flat)):
        prepared[name] = (
            None if image is None else np.ascontiguousarray(orient(image, flip, rotate))
        )
    common: dict[str, Any] = {
        "correctSolidAngle": correct_solid_angle,
        "error_model": error_model,
        "radial_range": radial_range,
        "azimuth_range": azimuth_range,
        "dummy": dummy,
        "delta_dummy": delta_dummy,
        "polarization_factor": polarization_factor,
        "method": method,
        "unit": unit,
        **prepared,
    }
    intensities, errors = [], []
    result = None
    for index, frame in enumerate(frames):
        if frame.ndim != 2:
            raise ParameterError(f"frame {index} has shape {frame.shape}: expected a 2D image")
        for name, image in (("mask", mask), ("dark", dark), ("flat", flat)):
            if image is not None and image.shape != frame.shape:
                raise ParameterError(
                    f"{name} has shape {image.shape} but the frames are {frame.shape}: "
                    f"give a {name} of the detector's size"
                )
        image = np.ascontiguousarray(orient(frame, flip, rotate))
        norm = 1.0
        if monitor is not None:
            if index >= len(monitor):
                raise ParameterError(f"{len(monitor)} monitor values for more frames")
            norm = float(monitor[index]) / monitor_reference
            if not np.isfinite(norm) or norm <= 0:
                raise ParameterError(
                    f"monitor '{monitor_name}' is {float(monitor[index])} at frame {index}: "
                    "cannot normalise; choose another counter or drop 'monitor'"
                )
        # The first frame sets the integrator up for these options (pixel positions, the
        # sparse matrix): one thread at a time (see SETUP_LOCK).
        with SETUP_LOCK if index == 0 else nullcontext():
            if npt_azim is None:
                result = integrator.integrate1d(image, npt, normalization_factor=norm, **common)
            else:
                result = integrator.integrate2d_ng(
                    image, npt, npt_azim, normalization_factor=norm, **common
                )
        intensities.append(result.intensity)
        errors.append(result.sigma)
    if result is None:
        raise ParameterError("no frames to integrate")
    has_errors = error_model is not None and result.sigma is not None
    return IntegratedFrames(
        radial=np.asarray(result.radial),
        radial_unit=unit,
        intensity=np.stack(intensities),
        errors=np.stack(errors) if has_errors else None,
        azimuthal=None if npt_azim is None else np.asarray(result.azimuthal),
    )
