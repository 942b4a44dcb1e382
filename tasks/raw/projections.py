"""Reading tomography scans: darks, flats, projections and their angles.

Four layouts are understood:

* **Bliss** dataset files as ESRF beamlines write them: one scan per series,
  told apart by ``technique/image_key`` when present, else by title as
  nxtomomill does ("dark images", "reference images"/"flat", "projections";
  "static images" and "return" scans are alignment frames and are skipped);
  the angle of every projection is the rotation motor's channel.
* **NXtomo** and **Data Exchange** files: :mod:`calypso.tasks.raw.tomography_files`.
* **TIFF (or any fabio image) stacks**: a folder of projections with dark and
  flat files beside them (or in folders of their own); the angles come from the
  parameters.

A scan is described by :class:`TomographyScan`, small enough to travel to every
task; tasks then read only the detector rows they reconstruct.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw import bliss, number_order
from calypso.tasks.raw.frames import (
    IMAGE_SUFFIXES,
    FrameSource,
    image_files_source,
    iter_frames,
    named_read_errors,
)
from calypso.techniques.tomography import TomographyParameters

# Ours first, then those nxtomomill looks for at ESRF's tomography beamlines.
ROTATION_MOTORS = (
    *("rotation", "srot", "rot", "hrsrot", "omega", "somega", "sampy_rot"),
    *("rotm", "mhsrot", "hsrot", "mrsrot", "srot_eh2", "diffrz", "hrrz_trig"),
)
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
    dark_level: float | None = None  # a constant dark, recorded instead of dark images
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
    where = f"{block.describe()}, rows {first}-{stop - 1}"
    with named_read_errors(where):
        if source.kind == "hdf5":
            with bliss.open_raw(source.files[0]) as h5:
                dset = h5[source.dataset]
                rows = (
                    dset[first:stop][None]
                    if dset.ndim == 2
                    else dset[block.start : block.stop, first:stop, :]
                )
        else:
            frames = iter_frames(source, block.start, block.stop)
            rows = np.stack([frame[first:stop] for frame in frames])
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        # NaN or infinite counts spread through the filter into the whole slice.
        bad = np.argwhere(~np.isfinite(rows))[0]
        raise RawDataError(
            f"{where}: {np.count_nonzero(~np.isfinite(rows))} pixels are NaN or infinite "
            f"(first: frame {block.start + bad[0]}, row {first + bad[1]}, column {bad[2]}); "
            "the file is damaged, or give rows=[FIRST,STOP] that leave them out"
        )
    return rows


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
        from calypso.tasks.raw.bliss_projections import bliss_scan
        from calypso.tasks.raw.tomography_files import dxchange_scan, nxtomo_entry, nxtomo_scan

        with bliss.open_raw(path) as h5:
            if any(bliss.SCAN_ENTRY.match(name) for name in h5):
                layout = "bliss"
            elif "exchange" in h5 and "data" in h5["exchange"]:
                layout = "dxchange"
            elif (entry := nxtomo_entry(h5)) is not None:
                layout = "nxtomo"
            else:
                raise RawDataError(
                    f"{path} is neither a Bliss dataset file (N.1 scan entries), an NXtomo "
                    "file (instrument/detector/image_key) nor Data Exchange (/exchange/data)"
                )
        if scans and layout != "bliss":
            raise ParameterError(f"--scan applies to Bliss files; {path.name} is {layout}")

        if layout == "bliss":
            scan = bliss_scan(path, parameters, scans)
        else:
            scan = dxchange_scan(path) if layout == "dxchange" else nxtomo_scan(path, entry)
    if parameters.angles is not None:
        first, last = parameters.angles
        scan = scan.model_copy(
            update={"angles_deg": np.linspace(first, last, scan.n_projections).tolist()}
        )
    check_scan(scan, parameters)
    return scan


MIN_DETECTOR_PX = 8  # columns: below that no centre of rotation can be searched
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
    given = "the angles given (--set angles)" if parameters.angles else "the file's angles"
    if not np.all(np.isfinite(angles)):
        bad = np.flatnonzero(~np.isfinite(angles))
        raise RawDataError(
            f"{where}: {len(bad)} rotation angles are NaN or infinite (first: projection "
            f"{bad[0]}); fix the file, or give --set angles=[FIRST,LAST] (degrees)"
        )
    steps = np.diff(angles)
    if len(steps) and not (np.all(steps > 0) or np.all(steps < 0)):
        # The first step against the scan's direction (or standing still), not the smallest.
        direction = np.sign(np.median(steps)) or 1.0
        wrong = int(np.flatnonzero(np.sign(steps) != direction)[0])
        raise RawDataError(
            f"{where}: {given} are not monotonic: from projection {wrong} to {wrong + 1} "
            f"they go {angles[wrong]:.4g} -> {angles[wrong + 1]:.4g} deg; check the rotation "
            "motor channel (or the scans chosen), or give --set angles=[FIRST,LAST]"
        )
    span = covered_deg(angles)
    if span < HALF_TURN_DEG:
        raise RawDataError(
            f"{where}: the projections cover {span:.1f} degrees; a reconstruction needs 180"
        )
    if scan.columns < MIN_DETECTOR_PX:
        raise RawDataError(
            f"{where}: projections of {scan.rows} x {scan.columns} pixels; a reconstruction "
            f"needs at least {MIN_DETECTOR_PX} columns: is this the right file?"
        )
    for block in scan.darks + scan.flats + scan.projections:
        if block.source.frame_shape != (scan.rows, scan.columns):
            raise RawDataError(
                f"{block.describe()}: images of {block.source.frame_shape}, the projections "
                f"are {(scan.rows, scan.columns)}"
            )


# -- image stacks -------------------------------------------------------------------


def images_under(folder: Path) -> list[tuple[Path, list[str]]]:
    """Every image file under ``folder`` (hidden ones left out), in number order, with the
    names it can be matched by: its path from ``folder`` and each part of it, in lower
    case."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix().lower()
        parts = relative.split("/")
        if (
            path.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in parts)
            and path.is_file()
        ):
            found.append((path, [relative, *parts]))
    return sorted(found, key=lambda image: number_order(image[0]))


def matching_images(
    folder: Path, patterns: str, images: list[tuple[Path, list[str]]] | None = None
) -> list[Path]:
    """The image files under ``folder`` (listed once by :func:`images_under`) whose name,
    the name of a folder they are in, or their path from ``folder`` (``tiffs/raw_*``)
    matches one of the comma-separated globs ``patterns`` in any case, in number order."""
    globs = [glob.strip().lower() for glob in patterns.split(",") if glob.strip()]
    return [
        path
        for path, names in (images_under(folder) if images is None else images)
        if any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)
    ]


def image_folder_scan(folder: Path, parameters: TomographyParameters) -> TomographyScan:
    """Projections, darks and flats as image files (TIFF, EDF ...) under ``folder``."""
    images = images_under(folder)  # one walk of the folder for the three kinds
    darks = matching_images(folder, parameters.darks, images)
    taken = set(darks)
    flats = [p for p in matching_images(folder, parameters.flats, images) if p not in taken]
    taken |= set(flats)
    projections = [
        p for p in matching_images(folder, parameters.projections, images) if p not in taken
    ]
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
