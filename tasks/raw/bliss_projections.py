"""Tomography scans of Bliss dataset files: one scan a series (darks, flats, projections),
told apart by ``technique/image_key`` when present, else by title as nxtomomill does
("dark images", "reference images"/"flat", "projections"; "static images" and "return"
scans are alignment frames and are skipped); the angle of every projection is the
rotation motor's channel. The other layouts are in :mod:`calypso.tasks.raw.projections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from calypso.errors import RawDataError
from calypso.tasks.raw import bliss
from calypso.tasks.raw.frames import hdf5_frame_source
from calypso.tasks.raw.projections import (
    IMAGE_KEY,
    ROTATION_MOTORS,
    FrameBlock,
    TomographyScan,
)
from calypso.techniques.tomography import TomographyParameters


def _role_from_title(title: str) -> str | None:
    text = title.lower()
    if "dark" in text:
        return "dark"
    if "flat" in text or "reference" in text or text.startswith("ref"):
        return "flat"
    if any(word in text for word in ("static", "return", "alignment")):
        return None
    if "projection" in text or "tomo" in text:
        return "projection"
    return "unknown"


def _role_from_key(entry: h5py.Group) -> str | None:
    if "technique/image_key" not in entry:
        return None
    keys = np.unique(np.asarray(entry["technique/image_key"][()]).ravel())
    if len(keys) != 1:
        return None
    return {value: name for name, value in IMAGE_KEY.items()}.get(int(keys[0]), "skip")


@dataclass
class BlissSeries:
    """The darks, flats and projections of some scans of a Bliss dataset file, in
    acquisition order (``position``: frames counted so far, skipped scans included)."""

    darks: list[FrameBlock] = field(default_factory=list)
    flats: list[FrameBlock] = field(default_factory=list)
    projections: list[FrameBlock] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    first_projections: bliss.ScanInfo | None = None
    position: float = 0.0


def scan_role(entry: h5py.Group, title: str) -> str | None:
    """What a Bliss scan entry holds: dark, flat, projection, skip (another image key),
    None (alignment frames), unknown (a projection scan if it has a rotation channel)."""
    return _role_from_key(entry) or _role_from_title(title)


def bliss_series(
    path: Path, infos: list[bliss.ScanInfo], detector: str, parameters: TomographyParameters
) -> BlissSeries:
    """The series of the scans ``infos`` (each must have ended) with ``detector``."""
    series = BlissSeries()
    with bliss.open_raw(path) as h5:
        for info in infos:
            if detector not in info.detectors:
                continue
            entry = h5[info.entry]
            role = scan_role(entry, info.title)
            motor = _rotation_channel(entry, parameters.rotation_motor, info.detectors[detector])
            if role == "unknown":
                role = "projection" if motor is not None else None
            dataset = f"{info.entry}/instrument/{detector}/data"
            n_frames = info.detectors[detector][0]
            if role is None or role == "skip":
                series.position += n_frames
                continue
            bliss.require_ended(path, info)
            block = FrameBlock(
                source=hdf5_frame_source(path, dataset),
                start=0,
                stop=n_frames,
                position=series.position,
            )
            series.position += n_frames
            series.used.append(info.number)
            if role == "dark":
                series.darks.append(block)
            elif role == "flat":
                series.flats.append(block)
            else:
                series.first_projections = series.first_projections or info
                series.projections.append(block)
                if motor is None:
                    raise RawDataError(
                        f"{path}: scan {info.number} ({info.title}) has no rotation angle for "
                        f"its frames (looked for measurement/ and instrument/positioners/"
                        f"{parameters.rotation_motor or '{' + ','.join(ROTATION_MOTORS) + '}'}"
                        "); set rotation_motor=NAME or give --set angles=[FIRST,LAST]"
                    )
                angles = np.asarray(entry[motor][()], dtype=np.float64).ravel()
                series.angles.extend(angles.tolist())
    return series


def bliss_scan(
    path: Path, parameters: TomographyParameters, wanted: list[int] | None
) -> TomographyScan:
    """The tomography scan made of the scans of a Bliss dataset file."""
    infos = bliss.select_scans(path, wanted)
    detector = bliss.choose_detector(path, infos, parameters.detector)
    series = bliss_series(path, infos, detector, parameters)
    if not series.projections:
        raise RawDataError(
            f"{path}: no projection scan with detector {detector} (titles with 'projections' "
            "or 'tomo', or a rotation channel per frame)"
        )
    first = series.first_projections
    assert first is not None
    return TomographyScan(
        layout="bliss",
        description=f"{path} (scans {', '.join(map(str, series.used))})",
        darks=series.darks,
        flats=series.flats,
        projections=series.projections,
        angles_deg=series.angles,
        bliss_scans=series.used,
        detector=detector,
        title=first.title,
        start_time=first.start_time,
        end_time=first.end_time,
    )


def _rotation_channel(entry: h5py.Group, name: str | None, shape: tuple[int, ...]) -> str | None:
    """The per-frame rotation angle dataset of a scan entry, if there is one."""
    names = [name] if name else list(ROTATION_MOTORS)
    # A scanned motor is a channel of measurement/; Bliss also keeps it, one value a
    # point, among the scan's positioners.
    for group in ("measurement", "instrument/positioners"):
        for candidate in names:
            location = f"{group}/{candidate}"
            if location in entry and entry[location].shape == (shape[0],):
                return location
    return None
