"""Reading MX images and their geometry: Bliss scans, NXmx (Eiger) masters, CBF series.

Every source becomes an :class:`MXScan`: where the frames are (a small
:class:`~calypso.tasks.raw.frames.FrameSource` per data file, read chunk by chunk
in the tasks), the detector geometry from the files' own headers (overridable
by parameters), which pixel values are invalid, and, for grid scans, the grid.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import fabio
import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw import bliss, number_order
from calypso.tasks.raw.cbf import CBF_SUFFIXES, check_cbf
from calypso.tasks.raw.frames import (
    FrameSource,
    eiger_data_files,
    hdf5_frame_source,
    image_files_source,
)
from calypso.techniques.mx import DetectorGeometry, MXParameters

GEOMETRY_FIELDS = ("beam_x_px", "beam_y_px", "distance_m", "wavelength_a", "pixel_size_um")
MESH_TITLE = re.compile(
    r"^\s*[ad]mesh\s+\S+\s+\S+\s+\S+\s+(\d+)\s+\S+\s+\S+\s+\S+\s+(\d+)", re.IGNORECASE
)
# Eiger firmware before NXmx 1.x kept the mask among the vendor's own fields.
NXMX_MASKS = (
    "entry/instrument/detector/pixel_mask",
    "entry/instrument/detector/detectorSpecific/pixel_mask",
)
OMEGA = ("entry/sample/transformations/omega", "entry/data/omega", "entry/sample/goniometer/omega")


class MXScan(BaseModel):
    """One series of MX images (a Bliss scan, an Eiger master, a CBF series)."""

    model_config = ConfigDict(frozen=True)

    name: str  # entry name in the output: "N.1" for Bliss, else "entry"
    description: str
    sources: list[FrameSource]  # one per data file, in frame order
    geometry: DetectorGeometry
    pixel_mask: str | None = None  # FILE::/dataset, non-zero = bad
    saturation: float | None = None  # counts at and above which a pixel is invalid
    grid: tuple[int, int] | None = None
    oscillation: tuple[float, float] | None = None  # start, increment (deg); 0: stills
    motors: dict[str, list[float]] = {}
    title: str = ""
    start_time: str | None = None
    end_time: str | None = None

    @property
    def n_frames(self) -> int:
        return sum(source.n_frames for source in self.sources)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.sources[0].frame_shape

    @property
    def rotation(self) -> bool:
        """A rotation scan (indexable), as opposed to stills (grid scans, serial)."""
        return self.grid is None and self.oscillation is not None and self.oscillation[1] != 0


# -- geometry ---------------------------------------------------------------------


def resolve_geometry(
    found: dict[str, float | None], parameters: MXParameters, where: str
) -> DetectorGeometry:
    """The file's geometry with the parameters' overrides; refuse a missing value."""
    values = {
        name: value if (value := getattr(parameters, name)) is not None else found.get(name)
        for name in GEOMETRY_FIELDS
    }
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise RawDataError(
            f"{where}: no {', '.join(missing)} in the file's header; give "
            + " ".join(f"--set {name}=VALUE" for name in missing)
        )
    try:
        return DetectorGeometry(**values)
    except ValidationError as exc:
        # The parameters are checked when given: what is wrong came from the file.
        wrong = [str(error["loc"][0]) for error in exc.errors()]
        raise RawDataError(
            f"{where}: the file gives "
            + ", ".join(f"{name} = {values[name]}" for name in wrong)
            + ", which is not physical (wavelength, distance and pixel size must be positive, "
            "every value finite); fix the file or give "
            + " ".join(f"--set {name}=VALUE" for name in wrong)
        ) from None


def _scalar(group: h5py.Group, *names: str) -> float | None:
    for name in names:
        if name in group:
            value = np.asarray(group[name][()], dtype=np.float64).ravel()
            if value.size:
                return float(value[0])
    return None


def _wavelength(instrument: h5py.Group) -> float | None:
    wavelength = _scalar(
        instrument, "beam/incident_wavelength", "monochromator/wavelength", "beam/wavelength"
    )
    if wavelength is not None:
        return wavelength * 1e10 if 0 < wavelength < 1e-6 else wavelength  # metres or Å
    energy = _scalar(instrument, "monochromator/energy", "beam/incident_energy")
    if energy is not None:
        return 12.398419843 / (energy / 1000 if energy > 1000 else energy)  # eV or keV
    return None


def hdf5_geometry(instrument: h5py.Group, detector: str) -> dict[str, float | None]:
    """NXmx names: beam_center_x/y (px), detector_distance (m), x_pixel_size (m)."""
    group = instrument.get(detector)
    if not isinstance(group, h5py.Group):
        return {}
    pixel = _scalar(group, "x_pixel_size")
    return {
        "beam_x_px": _scalar(group, "beam_center_x"),
        "beam_y_px": _scalar(group, "beam_center_y"),
        "distance_m": _scalar(group, "detector_distance", "distance"),
        "wavelength_a": _wavelength(instrument),
        "pixel_size_um": pixel * 1e6 if pixel is not None else None,
    }


def cbf_header(path: Path) -> dict[str, float | None]:
    """Geometry, cut-off and angles from a Pilatus miniCBF header (of a CBF whose header
    and binary agree: :func:`~calypso.tasks.raw.cbf.check_cbf`)."""
    text = check_cbf(path).header

    def number(pattern: str) -> float | None:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    beam = re.search(r"Beam_xy\s*\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*\)", text)
    pixel = number(r"Pixel_size\s+([-\d.eE+]+)\s*m")
    return {
        "beam_x_px": float(beam.group(1)) if beam else None,
        "beam_y_px": float(beam.group(2)) if beam else None,
        "distance_m": number(r"Detector_distance\s+([-\d.eE+]+)\s*m"),
        "wavelength_a": number(r"Wavelength\s+([-\d.eE+]+)\s*A"),
        "pixel_size_um": pixel * 1e6 if pixel is not None else None,
        "saturation": number(r"Count_cutoff\s+([-\d.eE+]+)"),
        "start_angle": number(r"Start_angle\s+([-\d.eE+]+)"),
        "angle_increment": number(r"Angle_increment\s+([-\d.eE+]+)"),
    }


SMV_SUFFIXES = (".img", ".img.gz", ".img.bz2")
# Read by fabio, geometry given with --set: MarCCD/Rayonix, R-AXIS, Bruker.
OTHER_SUFFIXES = tuple(
    f"{suffix}{packing}" for suffix in (".mccd", ".osc", ".sfrm") for packing in ("", ".gz", ".bz2")
)
MX_IMAGE_SUFFIXES = CBF_SUFFIXES + SMV_SUFFIXES + OTHER_SUFFIXES
# What an ADSC SMV header must hold for its geometry to be read (as DIALS reads it);
# d*TREK's SMV (Rigaku) headers are another convention, and give none here.
ADSC_KEYS = ("BEAM_CENTER_X", "BEAM_CENTER_Y", "DISTANCE", "WAVELENGTH", "PIXEL_SIZE")


def smv_header(path: Path) -> dict[str, float | None]:
    """Geometry and angles from an ADSC SMV header: millimetres, the beam centre in
    Mosflm's frame (``BEAM_CENTER_X`` along the slow axis, as DIALS reads ADSC images).

    Raises
    ------
    RawDataError
        When the image cannot be read, or its detector sits on a two-theta arm (a geometry
        this flat, beam-perpendicular model cannot hold).
    """
    try:
        image = fabio.open(str(path))
        header = {key.upper(): str(value) for key, value in image.header.items()}
        image.close()
    except (OSError, ValueError, RuntimeError) as exc:
        raise RawDataError(
            f"{path} cannot be read as an SMV image ({exc}); copy it again"
        ) from None

    def number(key: str) -> float | None:
        try:
            return float(header[key])
        except (KeyError, ValueError):
            return None

    if "DTREK_DATE_TIME" in header or any(number(key) is None for key in ADSC_KEYS):
        return {}
    two_theta = number("TWOTHETA") or 0.0
    if abs(two_theta) > 0.01:
        raise RawDataError(
            f"{path}: the detector is on a two-theta arm (TWOTHETA {two_theta} deg); Calypso's "
            "MX geometry is a detector perpendicular to the beam: reduce it with DIALS"
        )
    pixel_mm = number("PIXEL_SIZE") or 0.0
    return {
        "beam_x_px": number("BEAM_CENTER_Y") / pixel_mm if pixel_mm else None,
        "beam_y_px": number("BEAM_CENTER_X") / pixel_mm if pixel_mm else None,
        "distance_m": number("DISTANCE") / 1000,
        "wavelength_a": number("WAVELENGTH"),
        "pixel_size_um": pixel_mm * 1000,
        "saturation": 65535.0 if header.get("TYPE", "").lower() == "unsigned_short" else None,
        "start_angle": number("OSC_START"),
        "angle_increment": number("OSC_RANGE"),
    }


def image_header(path: Path) -> dict[str, float | None]:
    name = path.name.lower()
    if name.endswith(CBF_SUFFIXES):
        return cbf_header(path)
    return smv_header(path) if name.endswith(SMV_SUFFIXES) else {}


# -- sources ------------------------------------------------------------------------


def grid_from_title(title: str) -> tuple[int, int] | None:
    """(rows, columns) of a Bliss ``amesh``/``dmesh`` (fast motor first, intervals given)."""
    match = MESH_TITLE.match(title)
    if not match:
        return None
    fast, slow = int(match.group(1)), int(match.group(2))
    return slow + 1, fast + 1


def _grid_motor_positions(measurement: h5py.Group | None) -> dict[str, list[float]]:
    """The sample motors' position at every image. A motor whose positions are not all
    finite numbers (an encoder that dropped out) gives none: the grid keeps its rows and
    columns, the centring its cell."""
    motors: dict[str, list[float]] = {}
    for name in ("sy", "sz", "sampy", "sampz", "phiy", "phiz"):
        if measurement is None or name not in measurement:
            continue
        try:
            values = np.asarray(measurement[name][()], dtype=np.float64).ravel()
        except (TypeError, ValueError):  # not numbers
            continue
        if np.all(np.isfinite(values)):
            motors[name] = values.tolist()
    return motors


def bliss_scans(path: Path, parameters: MXParameters, wanted: list[int] | None) -> list[MXScan]:
    infos = bliss.select_scans(path, wanted)
    infos = [info for info in infos if info.detectors]
    if not infos:
        raise RawDataError(f"{path}: no scan has a 2D detector (instrument/<detector>/data)")
    detector = bliss.choose_detector(path, infos, parameters.detector)
    scans = []
    for info in infos:
        if detector not in info.detectors:
            continue
        bliss.require_ended(path, info)
        dataset = f"{info.entry}/instrument/{detector}/data"
        with bliss.open_raw(path) as h5:
            instrument = h5[f"{info.entry}/instrument"]
            found = hdf5_geometry(instrument, detector)
            has_mask = "pixel_mask" in instrument[detector]
            motors = _grid_motor_positions(h5.get(f"{info.entry}/measurement"))
        source = hdf5_frame_source(path, dataset)
        scans.append(
            MXScan(
                name=info.entry,
                description=f"{path}::/{dataset}",
                sources=[source],
                geometry=resolve_geometry(found, parameters, f"{path} scan {info.number}"),
                pixel_mask=f"{path}::/{info.entry}/instrument/{detector}/pixel_mask"
                if has_mask
                else None,
                saturation=float(np.iinfo(source.dtype).max)
                if np.dtype(source.dtype).kind == "u"
                else None,
                grid=parameters.grid or grid_from_title(info.title),
                motors=motors,
                title=info.title,
                start_time=info.start_time,
                end_time=info.end_time,
            )
        )
    return scans


def nxmx_scan(path: Path, parameters: MXParameters) -> MXScan:
    """An NXmx master (Eiger): ``entry/data/data`` (VDS) or ``data_NNNNNN`` external links."""
    with bliss.open_raw(path) as h5:
        if "entry/data" not in h5:
            raise RawDataError(f"{path}: no entry/data group: not an NXmx master file")
        found = (
            hdf5_geometry(h5["entry/instrument"], "detector") if "entry/instrument" in h5 else {}
        )
        pixel_mask = next((name for name in NXMX_MASKS if name in h5), None)
        detector = h5.get("entry/instrument/detector")
        cutoff = (
            _scalar(
                detector, "saturation_value", "detectorSpecific/countrate_correction_count_cutoff"
            )
            if isinstance(detector, h5py.Group)
            else None
        )
        omega_name = next((name for name in OMEGA if name in h5), None)
        omega = np.asarray(h5[omega_name][()], dtype=np.float64).ravel() if omega_name else None
    if omega is not None and not np.all(np.isfinite(omega)):
        bad = np.flatnonzero(~np.isfinite(omega))
        raise RawDataError(
            f"{path}: {omega_name}, the rotation angle of every image, is NaN or infinite at "
            f"{len(bad)} of {len(omega)} images (first: image {bad[0]}); fix the master file"
        )
    # A master holds a VDS "data" over the data files, or links "data_NNNNNN" to them
    # (older Eiger firmware), or both: then "data" alone has every frame.
    sources = [
        hdf5_frame_source(file, dataset) for file, dataset in eiger_data_files(path, whole=True)
    ]
    if not sources:
        raise RawDataError(f"{path}: entry/data holds no image data (data or data_NNNNNN)")
    dtype = np.dtype(sources[0].dtype)
    saturation = float(np.iinfo(dtype).max) if dtype.kind == "u" else None
    if cutoff is not None and math.isfinite(cutoff) and cutoff > 0:
        # The detector's own: DLS's masters declare 16-bit Eiger frames as 64-bit, where
        # 65535 (a gap, a defective pixel) is no type's maximum.
        saturation = min(cutoff, saturation) if saturation is not None else cutoff
    return MXScan(
        name="entry",
        description=str(path),
        sources=sources,
        geometry=resolve_geometry(found, parameters, str(path)),
        pixel_mask=f"{path}::/{pixel_mask}" if pixel_mask else None,
        saturation=saturation,
        grid=parameters.grid,
        oscillation=(float(omega[0]), float(omega[1] - omega[0]))
        if omega is not None and len(omega) > 1
        else None,
    )


def image_series_scan(files: list[Path], parameters: MXParameters, name: str) -> MXScan:
    """A series of CBF (or other fabio) images, geometry from the first one's header."""
    for path in files:
        if not path.is_file() or path.stat().st_size == 0:
            raise RawDataError(f"{path} is missing or empty")
    header = image_header(files[0])
    source = image_files_source(files)
    return MXScan(
        name="entry",
        description=f"{files[0]} (+{len(files) - 1})" if len(files) > 1 else str(files[0]),
        sources=[source],
        geometry=resolve_geometry(header, parameters, str(files[0])),
        saturation=header.get("saturation"),
        grid=parameters.grid,
        oscillation=(header["start_angle"], header["angle_increment"])
        if header.get("start_angle") is not None and header.get("angle_increment") is not None
        else None,
        title=name,
    )


def open_mx_scans(
    path: Path, parameters: MXParameters, scans: list[int] | None
) -> tuple[list[MXScan], bool]:
    """The scans in ``path`` and whether ``path`` is a Bliss file."""
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.glob(parameters.images)
                if p.is_file() and p.name.lower().endswith(MX_IMAGE_SUFFIXES)
            ),
            key=number_order,
        )
        if not files:
            raise RawDataError(
                f"{path} holds no MX images ({', '.join(MX_IMAGE_SUFFIXES)}) matching "
                f"{parameters.images!r}"
            )
        return [image_series_scan(files, parameters, path.name)], False
    if path.name.lower().endswith(MX_IMAGE_SUFFIXES):
        return [image_series_scan([path], parameters, path.name)], False
    with bliss.open_raw(path) as h5:
        is_bliss = any(bliss.SCAN_ENTRY.match(name) for name in h5)
    if is_bliss:
        return bliss_scans(path, parameters, scans), True
    if scans:
        raise ParameterError(f"--scan applies to Bliss files; {path.name} is an NXmx master")
    return [nxmx_scan(path, parameters)], False
