"""The tomography flow's parameters: which frames, which corrections, how the work runs.

Angles are in degrees, lengths in the unit each name says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from calypso.techniques.fields import TechniqueParameters
from calypso.techniques.tomography.flat_field import DEFAULT_LOG_FLOOR
from calypso.techniques.tomography.rings import ring_filter_size

# Smoothing windows of the ramp filter: algotom's (fbp, dfi) and tomopy's (gridrec).
ALGOTOM_WINDOWS = ("hann", "hamming", "bartlett", "blackman", "nuttall", "parzen", "triang")
TOMOPY_FILTERS = ("shepp", "cosine", "hann", "hamming", "ramlak", "parzen", "butterworth")
UNWINDOWED = ("none", "ramp", "ram-lak", "")


class TomographySource(TechniqueParameters):
    """Which frames to read: detector, rotation angles, rows, and the files of an image folder."""

    model_config = ConfigDict(extra="forbid")

    rows: tuple[int, int] | None = Field(
        None, description="detector rows [first, stop) to reconstruct (default: all)"
    )
    detector: str | None = Field(
        None, description="Bliss: the 2D detector (default: the only one in the scans)"
    )
    rotation_motor: str | None = Field(
        None,
        description="Bliss: counter or positioner holding the rotation angle of every frame "
        "(default: the first of rotation, srot, rot, hrsrot, omega, somega, sampy_rot and the "
        "motors nxtomomill knows: rotm, mhsrot, hsrot, mrsrot, srot_eh2, diffrz, hrrz_trig)",
    )
    angles: tuple[float, float] | None = Field(
        None,
        description="first and last projection angle in degrees, inclusive, for inputs "
        "without angles (TIFF stacks); overrides angles read from the file",
    )
    projections: str = Field(
        "*",
        description="image folder: globs of the projection files, comma-separated (darks and "
        "flats excluded)",
        json_schema_extra={"path": "glob"},
    )
    darks: str = Field(
        "dark*,df_*",
        description="image folder: globs of the dark-field files, comma-separated, matched in "
        "any case against the file's name or the name of a folder it is in",
        json_schema_extra={"path": "glob"},
    )
    flats: str = Field(
        "flat*,white*,ref*,bright*,ob_*,openbeam*",
        description="image folder: globs of the flat-field files, comma-separated, matched in "
        "any case against the file's name or the name of a folder it is in",
        json_schema_extra={"path": "glob"},
    )

    @model_validator(mode="after")
    def _angles_apart(self) -> TomographySource:
        if self.angles is not None and self.angles[0] == self.angles[1]:
            raise ValueError(
                f"angles={list(self.angles)}: the first and last projection angles must differ "
                "(e.g. [0, 180] for a half turn)"
            )
        return self

    @model_validator(mode="after")
    def _rows_in_order(self) -> TomographySource:
        if self.rows is not None and not 0 <= self.rows[0] < self.rows[1]:
            raise ValueError(f"rows={list(self.rows)}: expected [first, stop) with first < stop")
        return self


class TomographyScience(TechniqueParameters):
    """Corrections, phase retrieval, centre of rotation and reconstruction algorithm."""

    model_config = ConfigDict(extra="forbid")

    flat_field: bool = Field(True, description="divide by flats after subtracting darks")
    minus_log: bool = Field(True, description="take -log of the transmission")
    log_floor: float = Field(
        DEFAULT_LOG_FLOOR, gt=0, lt=1, description="transmission floor before -log"
    )
    ring_removal: bool = Field(
        True, description="remove ring artefacts (stripes in sinograms) by sorting (Vo 2018)"
    )
    ring_size: int | None = Field(
        None,
        ge=3,
        description="ring removal: median filter width in pixels, odd (an even one is "
        "taken as the next odd one; default: 1% of the detector width, at least 3; 21 on a "
        "2048-pixel detector)",
    )
    center_of_rotation: float | None = Field(
        None,
        description="rotation axis position in detector columns (0 = first column's centre); "
        "found automatically when not given",
    )
    cor_search: float | None = Field(
        None,
        gt=0,
        description="automatic centre: search this many pixels either side of the detector "
        "centre (default: an eighth of the width)",
    )
    paganin: bool = Field(False, description="single-material Paganin phase retrieval")
    energy_kev: float | None = Field(None, gt=0, description="Paganin: beam energy, keV")
    distance_m: float | None = Field(None, gt=0, description="Paganin: sample-detector distance, m")
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="effective pixel size, um (voxel size of the output; needed by Paganin)",
    )
    delta_beta: float = Field(100.0, gt=0, description="Paganin: delta/beta of the material")
    algorithm: Literal["fbp", "dfi", "gridrec"] = Field(
        "fbp",
        description="fbp: filtered back-projection (algotom, numba); dfi: direct Fourier "
        "inversion (algotom); gridrec: tomopy's gridrec (needs tomopy installed)",
    )
    min_projections: int | None = Field(
        None,
        ge=2,
        description="refuse scans with fewer projections than this (default: neighbouring "
        "projections at most 16 pixels apart at the edge of the field of view, e.g. 64 over "
        "180 degrees for 640 columns); set it to reconstruct sparse-view scans",
    )
    filter_name: str = Field(
        "hann",
        description="smoothing window of the ramp filter (hann, hamming, bartlett, blackman, "
        "parzen, ... or none)",
    )
    circle_mask: bool = Field(True, description="zero the corners outside the field of view")

    @field_validator("ring_size")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        return value if value is None or value % 2 else value + 1

    def ring_filter_size(self, width: int) -> int:
        """The ring-removal filter width for a detector ``width`` pixels wide.

        ``ring_size``, or 1% of the width (see
        :func:`~calypso.techniques.tomography.rings.ring_filter_size`).
        """
        return ring_filter_size(width, self.ring_size)

    @field_validator("filter_name")
    @classmethod
    def _filter(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _known_filter(self) -> TomographyScience:
        # algotom (fbp, dfi) reconstructs an unknown window's name without any window, and
        # tomopy's gridrec knows its own: a typo ('hanning') would go unseen.
        known = TOMOPY_FILTERS if self.algorithm == "gridrec" else ALGOTOM_WINDOWS
        if self.filter_name not in (*known, *UNWINDOWED):
            raise ValueError(
                f"filter_name {self.filter_name!r} is not a window {self.algorithm} knows: "
                f"{', '.join(known)}, or none"
            )
        return self

    @model_validator(mode="after")
    def _paganin_physics(self) -> TomographyScience:
        if self.paganin and None in (self.energy_kev, self.distance_m, self.pixel_size_um):
            raise ValueError(
                "paganin=true needs energy_kev, distance_m and pixel_size_um "
                "(e.g. --set energy_kev=19 --set distance_m=0.5 --set pixel_size_um=6.5)"
            )
        return self

    @property
    def smoothing_window(self) -> str | None:
        return None if self.filter_name in ("none", "ramp", "ram-lak", "") else self.filter_name


class TomographyExecution(TechniqueParameters):
    """Full run or quick preview, GPU, output type and files, rows per task."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["full", "preview"] = Field(
        "full",
        description="full: reconstruct the whole volume; preview: the centre and quartile "
        "slices with a small centre-of-rotation sweep, in seconds",
    )
    gpu: bool | None = Field(
        None,
        description="fbp on an NVIDIA GPU (CUDA via numba): true, false, or unset = when one "
        "is present",
    )
    output_range: tuple[float, float] | None = Field(
        None,
        description="clip the reconstructed values to [min, max] (and map this range onto an "
        "integer output type)",
    )
    output_dtype: Literal["float32", "uint16", "uint8"] = Field(
        "float32",
        description="output data type; integer types map output_range (default: the 0.1-99.9 "
        "percentiles of the centre slice) onto the full integer range",
    )
    tiff: bool = Field(False, description="also write the slices as a TIFF stack")
    chunk_rows: int | None = Field(
        None, ge=1, description="detector rows (slices) per task (default: from the data size)"
    )
    preview_binning: int | None = Field(
        None,
        ge=1,
        description="preview: bin columns and angles by this factor (default: 1 up to 2047 "
        "columns, 2 from 2048, ...), 8 times less work at 2",
    )
    preview_cor_offsets: list[float] = Field(
        default_factory=lambda: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
        description="preview: centre-of-rotation offsets (pixels) tried on the centre slice",
    )

    @model_validator(mode="after")
    def _output_range_in_order(self) -> TomographyExecution:
        if self.output_range is not None and not self.output_range[0] < self.output_range[1]:
            raise ValueError(f"output_range={list(self.output_range)}: expected [min, max]")
        return self


# pydantic orders the fields from the last base to the first: source, science, execution.
class TomographyParameters(TomographyExecution, TomographyScience, TomographySource):
    """What to do with a tomography scan; every step can be switched off.

    Angles are in degrees, lengths in the unit each name says.
    """

    model_config = ConfigDict(extra="forbid")
