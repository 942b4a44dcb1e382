"""Reading tomography scans: darks, flats, projections and their angles.

Four layouts are understood:

* **Bliss** dataset files as ESRF beamlines write them: one scan per series,
  told apart by ``technique/image_key`` when present, else by title as
  nxtomomill does ("dark images", "reference images"/"flat", "projections";
  "static images" and "return" scans are alignment frames and are skipped);
  the angle of every projection is the rotation motor's channel.
* **NXtomo** (what nxtomomill writes): one detector dataset with
  ``image_key_control`` / ``image_key`` and ``sample/rotation_angle``.
* **Data Exchange** (APS, tomopy's ``dxchange``): ``/exchange/data``,
  ``data_white``, ``data_dark`` and ``theta``.
* **TIFF (or any fabio image) stacks**: a folder of projections with dark and
  flat files beside them; the angles come from the parameters.

A scan is described by :class:`TomographyScan`, small enough to travel to every
task; tasks then read only the detector rows they reconstruct.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw import bliss
from calypso.tasks.raw.frames import (
    IMAGE_SUFFIXES,
    FrameSource,
    hdf5_frame_source,
    image_files_source,
    iter_frames,
    named_read_errors,
)
from calypso.techniques.tomography import TomographyParameters

ROTATION_MOTORS = ("rotation", "srot", "rot", "hrsrot", "omega", "somega", "sampy_rot")
IMAGE_KEY = {"projection": 0, "flat": 1, "dark": 2}


class FrameBlock(BaseModel):
    """Frames ``start:stop`` of a source, taken from acquisition frame ``position`` on."""

    model_config = ConfigDict(frozen=True)

    source: FrameSource
    start: int
    stop: int
    position: float

    @property
    def n_frames(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.source.describe()} frames {self.start}-{self.stop - 1}"


class TomographyScan(BaseModel):
    """Where a scan's darks, flat series and projections are, and the projection angles."""

    model_config = ConfigDict(frozen=True)

    layout: str  # bliss, nxtomo, dxchange, images
    description: str
    darks: list[FrameBlock]
    flats: list[FrameBlock]  # one block a flat series
    projections: list[FrameBlock]
    angles_deg: list[float]
    bliss_scans: list[int] = []
    detector: str | None = None
    title: str = ""
    start_time: str | None = None
    end_time: str | None = None
    entry: str | None = None  # the projections' Bliss entry (N.1) when their frames are
    # read from elsewhere (a live scan's Lima files); else the first one's dataset says it

    @property
    def rows(self) -> int:
        return self.projections[0].source.frame_shape[0]

    @property
    def columns(self) -> int:
        return self.projections[0].source.frame_shape[1]

    @property
    def n_projections(self) -> int:
        return sum(block.n_frames for block in self.projections)

    @property
    def angles_rad(self) -> np.ndarray:
        return np.radians(np.asarray(self.angles_deg, dtype=np.float64))

    def projection_positions(self) -> np.ndarray:
        return np.concatenate(
            [block.position + np.arange(block.n_frames) for block in self.projections]
        )

    def flat_positions(self) -> np.ndarray:
        return np.array([block.position + (block.n_frames - 1) / 2 for block in self.flats])


# -- reading rows -------------------------------------------------------------


def read_block_rows(block: FrameBlock, first: int, stop: int) -> np.ndarray:
    """Rows ``first:stop`` of every frame of a block, shape (frames, rows, columns).

    Raises
    ------
    RawDataError
        When the file cannot deliver them (corrupt compressed chunk, truncated file).
    """
    source = block.source
    with named_read_errors(f"{block.describe()}, rows {first}-{stop - 1}"):
        if source.kind == "hdf5":
            with bliss.open_raw(source.files[0]) as h5:
                dset = h5[source.dataset]
                if dset.ndim == 2:
                    return dset[first:stop][None]
                return dset[block.start : block.stop, first:stop, :]
        frames = iter_frames(source, block.start, block.stop)
        return np.stack([frame[first:stop] for frame in frames])


def read_projection_rows(scan: TomographyScan, first: int, stop: int) -> np.ndarray:
    """Rows ``first:stop`` of all projections, in angle order of ``scan.angles_deg``."""
    parts = [read_block_rows(block, first, stop) for block in scan.projections]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def mean_rows(blocks: list[FrameBlock], first: int, stop: int) -> np.ndarray:
    """The mean of rows ``first:stop`` over all frames of all blocks (darks)."""
    total = None
    count = 0
    for block in blocks:
        frames = read_block_rows(block, first, stop).astype(np.float64)
        total = frames.sum(axis=0) if total is None else total + frames.sum(axis=0)
        count += len(frames)
    assert total is not None
    return (total / count).astype(np.float32)


def flat_series_rows(scan: TomographyScan, first: int, stop: int) -> np.ndarray:
    """Mean rows ``first:stop`` of each flat series, shape (series, rows, columns)."""
    return np.stack([mean_rows([block], first, stop) for block in scan.flats])


# -- finding the scan -----------------------------------------------------------


def open_tomography_scan(
    path: Path, parameters: TomographyParameters, scans: list[int] | None = None
) -> TomographyScan:
    """Describe the tomography scan in ``path`` (file or folder); check it is complete.

    Raises
    ------
    RawDataError
        When the layout is not recognised or a series is missing or inconsistent.
    """
    if path.is_dir():
        scan = image_folder_scan(path, parameters)
    else:
        with bliss.open_raw(path) as h5:
            if any(bliss.SCAN_ENTRY.match(name) for name in h5):
                layout = "bliss"
            elif "exchange" in h5 and "data" in h5["exchange"]:
                layout = "dxchange"
            elif _nxtomo_entry(h5) is not None:
                layout = "nxtomo"
            else:
                raise RawDataError(
                    f"{path} is neither a Bliss dataset file (N.1 scan entries), an NXtomo "
                    "file (instrument/detector/image_key) nor Data Exchange (/exchange/data)"
                )
        if scans and layout != "bliss":
            raise ParameterError(f"--scan applies to Bliss files; {path.name} is {layout}")
        from calypso.tasks.raw.bliss_projections import bliss_scan

        reader = {"bliss": bliss_scan, "dxchange": dxchange_scan, "nxtomo": nxtomo_scan}[layout]
        scan = reader(path, parameters, scans) if layout == "bliss" else reader(path)
    if parameters.angles is not None:
        first, last = parameters.angles
        scan = scan.model_copy(
            update={"angles_deg": np.linspace(first, last, scan.n_projections).tolist()}
        )
    check_scan(scan, parameters)
    return scan


HALF_TURN_DEG = 179.0  # what a reconstruction needs: a half turn, one step short at most


def covered_deg(angles: np.ndarray) -> float:
    """The rotation projections at ``angles`` (degrees) cover: first to last, plus a step."""
    angles = np.asarray(angles, dtype=np.float64)
    if len(angles) < 2:
        return 0.0
    return float(abs(angles[-1] - angles[0]) + np.abs(np.diff(angles)).mean())


def check_scan(scan: TomographyScan, parameters: TomographyParameters) -> None:
    """Refuse a scan that cannot be reconstructed, with a message that says why."""
    where = scan.description
    if scan.n_projections == 0:
        raise RawDataError(f"{where}: no projections found")
    if parameters.flat_field and not scan.flats:
        raise RawDataError(
            f"{where}: no flat-field images (flats / reference images) found; they are needed "
            "for the flat-field correction. Add them, or set flat_field=false for data that "
            "is already normalised"
        )
    if len(scan.angles_deg) == 0:
        raise RawDataError(
            f"{where}: no rotation angles; give them with --set angles=[FIRST,LAST] (degrees)"
        )
    if len(scan.angles_deg) != scan.n_projections:
        raise RawDataError(
            f"{where}: {len(scan.angles_deg)} angles for {scan.n_projections} projections; "
            "they must match one to one (fix the file or give --set angles=[FIRST,LAST])"
        )
    angles = np.asarray(scan.angles_deg)
    if not np.all(np.isfinite(angles)):
        raise RawDataError(f"{where}: the rotation angles contain NaN or infinite values")
    steps = np.diff(angles)
    if len(steps) and not (np.all(steps > 0) or np.all(steps < 0)):
        raise RawDataError(
            f"{where}: the rotation angles are not monotonic (a step of "
            f"{steps[np.argmin(np.abs(steps))]:.3g} deg at projection "
            f"{int(np.argmin(np.abs(steps)))}); check the rotation motor channel"
        )
    span = covered_deg(angles)
    if span < HALF_TURN_DEG:
        raise RawDataError(
            f"{where}: the projections cover {span:.1f} degrees; a reconstruction needs 180"
        )
    for block in scan.darks + scan.flats + scan.projections:
        if block.source.frame_shape != (scan.rows, scan.columns):
            raise RawDataError(
                f"{block.describe()}: images of {block.source.frame_shape}, the projections "
                f"are {(scan.rows, scan.columns)}"
            )


# -- NXtomo and Data Exchange ---------------------------------------------------


def _nxtomo_entry(h5: h5py.File) -> str | None:
    for name, item in h5.items():
        if isinstance(item, h5py.Group) and "instrument/detector/data" in item:
            detector = item["instrument/detector"]
            if "image_key_control" in detector or "image_key" in detector:
                return name
    return None


def _angles_in_degrees(dataset: h5py.Dataset) -> np.ndarray:
    values = np.asarray(dataset[()], dtype=np.float64).ravel()
    units = dataset.attrs.get("units", b"")
    units = units.decode() if isinstance(units, bytes) else str(units)
    if units.lower().startswith("rad") or (not units and np.abs(values).max() <= 2 * math.pi + 0.1):
        return np.degrees(values)
    return values


def _runs(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """(key, start, stop) of each run of equal keys."""
    edges = np.flatnonzero(np.diff(keys)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(keys)]])
    return [(int(keys[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def nxtomo_scan(path: Path) -> TomographyScan:
    """An NXtomo entry: frames tagged by image key, angles in ``sample/rotation_angle``."""
    with bliss.open_raw(path) as h5:
        name = _nxtomo_entry(h5)
        assert name is not None
        detector = h5[f"{name}/instrument/detector"]
        key_name = "image_key_control" if "image_key_control" in detector else "image_key"
        keys = np.asarray(detector[key_name][()]).astype(int)
        angle_location = f"{name}/sample/rotation_angle"
        all_angles = _angles_in_degrees(h5[angle_location]) if angle_location in h5 else None
    source = hdf5_frame_source(path, f"{name}/instrument/detector/data")
    if len(keys) != source.n_frames:
        raise RawDataError(
            f"{path}: {key_name} has {len(keys)} values for {source.n_frames} frames"
        )
    darks, flats, projections = [], [], []
    angles: list[float] = []
    for key, start, stop in _runs(keys):
        block = FrameBlock(source=source, start=start, stop=stop, position=float(start))
        if key == IMAGE_KEY["dark"]:
            darks.append(block)
        elif key == IMAGE_KEY["flat"]:
            flats.append(block)
        elif key == IMAGE_KEY["projection"]:
            projections.append(block)
            if all_angles is not None:
                if len(all_angles) != len(keys):
                    raise RawDataError(
                        f"{path}: {angle_location} has {len(all_angles)} values for "
                        f"{len(keys)} frames"
                    )
                angles.extend(all_angles[start:stop].tolist())
    return TomographyScan(
        layout="nxtomo",
        description=f"{path}::/{name}",
        darks=darks,
        flats=flats,
        projections=projections,
        angles_deg=angles,
    )


def dxchange_scan(path: Path) -> TomographyScan:
    """Data Exchange: projections, flats (taken before) and darks in ``/exchange``."""

    def block(name: str, position: float) -> FrameBlock | None:
        with bliss.open_raw(path) as h5:
            if name not in h5:
                return None
        source = hdf5_frame_source(path, name)
        return FrameBlock(source=source, start=0, stop=source.n_frames, position=position)

    darks = block("/exchange/data_dark", 0.0)
    flats = block("/exchange/data_white", float(darks.n_frames if darks else 0))
    offset = (darks.n_frames if darks else 0) + (flats.n_frames if flats else 0)
    projections = block("/exchange/data", float(offset))
    assert projections is not None
    with bliss.open_raw(path) as h5:
        angles = _angles_in_degrees(h5["/exchange/theta"]) if "/exchange/theta" in h5 else []
    return TomographyScan(
        layout="dxchange",
        description=str(path),
        darks=[darks] if darks else [],
        flats=[flats] if flats else [],
        projections=[projections],
        angles_deg=list(angles),
    )


# -- image stacks -------------------------------------------------------------------


def image_folder_scan(folder: Path, parameters: TomographyParameters) -> TomographyScan:
    """Projections, darks and flats as image files (TIFF, EDF ...) under ``folder``."""

    def images(pattern: str) -> list[Path]:
        return sorted(
            p
            for p in folder.rglob(pattern)
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    darks, flats = images(parameters.darks), images(parameters.flats)
    taken = set(darks) | set(flats)
    projections = [p for p in images(parameters.projections) if p not in taken]
    if not projections:
        raise RawDataError(
            f"{folder} holds no projection images ({', '.join(IMAGE_SUFFIXES)}) matching "
            f"{parameters.projections!r}"
        )
    projection_source = image_files_source(projections)

    def block(files: list[Path], position: float) -> list[FrameBlock]:
        if not files:
            return []
        source = image_files_source(files)
        return [FrameBlock(source=source, start=0, stop=source.n_frames, position=position)]

    dark_blocks = block(darks, 0.0)
    flat_blocks = block(flats, float(len(darks)))
    return TomographyScan(
        layout="images",
        description=f"{folder} ({len(projections)} projection files)",
        darks=dark_blocks,
        flats=flat_blocks,
        projections=[
            FrameBlock(
                source=projection_source,
                start=0,
                stop=projection_source.n_frames,
                position=float(len(darks) + len(flats)),
            )
        ],
        angles_deg=[],
    )
