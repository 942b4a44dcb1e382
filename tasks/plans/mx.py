"""Planning an MX run: which images, which geometry, which chunks.

Runs before Prefect or Dask start, on headers and metadata only, so bad input
(a corrupt CBF, a missing Eiger data file, no geometry) fails in a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.preflight import require_output_room, require_registrable
from calypso.tasks.raw import bliss
from calypso.tasks.raw.data_policy import RawDataset, output_folder
from calypso.tasks.raw.frames import read_image
from calypso.tasks.raw.mx_images import MXScan, open_mx_scans
from calypso.techniques.masks import check_unmasked
from calypso.techniques.mx import MXParameters

TECHNIQUE = "mx"
BYTES_PER_IMAGE = 32 * 1024  # figures and spot list of an image in the report
SECONDS_PER_PIXEL = 4.5e-8  # dispersion threshold, background, labels: ~0.2 s an Eiger 4M


class ImageChunk(BaseModel):
    """Frames ``start:stop`` of data file ``source`` of scan ``scan`` (indices into the plan)."""

    model_config = ConfigDict(frozen=True)

    scan: int
    source: int
    start: int
    stop: int
    first_frame: int  # index of ``start`` in the whole scan


class MXPlan(BaseModel):
    input: str
    raw: RawDataset | None
    raw_file: str | None
    scans: list[MXScan]
    parameters: MXParameters
    output_dir: str
    output_file: str
    chunk_size: int

    @property
    def n_frames(self) -> int:
        return sum(scan.n_frames for scan in self.scans)

    def chunks(self) -> list[ImageChunk]:
        chunks = []
        for index, scan in enumerate(self.scans):
            first = 0
            for number, source in enumerate(scan.sources):
                for start in range(0, source.n_frames, self.chunk_size):
                    stop = min(start + self.chunk_size, source.n_frames)
                    chunks.append(ImageChunk(scan=index, source=number, start=start, stop=stop,
                                             first_frame=first + start))  # fmt: skip
                first += source.n_frames
        return chunks


def default_chunk_size(n_frames: int, pixels: int, workers: int) -> int:
    """At least ~2 s of work a task (Prefect's ~0.1 s a task stays a few percent), up to
    half a worker's share, never more than 100 frames (a task's spots stay small)."""
    per_frame = max(pixels * SECONDS_PER_PIXEL, 1e-6)
    enough = math.ceil(2.0 / per_frame)
    balanced = math.ceil(n_frames / (2 * max(workers, 1)))
    return max(1, min(100, max(enough, balanced), n_frames))


def require_unmasked(
    scan: MXScan, parameters: MXParameters, pixel_mask: np.ndarray | None = None
) -> None:
    """Refuse a static mask (the detector's pixel mask and the user's) that leaves fewer
    pixels than ``min_unmasked_fraction``: every image would have no spots at all.
    ``pixel_mask``: the scan's pixel mask, read already (a live scan's, from the file
    its writer holds)."""
    masks = [(parameters.mask, "mask")] if parameters.mask is not None else []
    if scan.pixel_mask is not None:
        masks.append((scan.pixel_mask, "pixel mask"))
    if not masks:
        return
    masked = np.zeros(scan.frame_shape, dtype=bool)
    for location, what in masks:
        given = pixel_mask if what == "pixel mask" else None
        image = read_image(location, what) if given is None else np.asarray(given)
        if image.shape == masked.shape:  # a pixel mask of another size is not this one's
            masked |= image != 0
    try:
        check_unmasked(masked, parameters.min_unmasked_fraction)
    except ValueError as exc:
        named = " and ".join(f"{what} {location}" for location, what in masks)
        error = ParameterError if parameters.mask is not None else RawDataError
        raise error(
            f"{named}: {exc}; fix the mask, or lower min_unmasked_fraction if so little of "
            "the detector is meant to be used"
        ) from None


def make_mx_plan(
    input_path: str,
    parameters: MXParameters,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    settings: CalypsoSettings | None = None,
    workers: int = 1,
) -> MXPlan:
    """Check the images, geometry and parameters and decide the chunks.

    Raises
    ------
    CalypsoError
        With a message naming the file and what to do.
    """
    settings = settings or CalypsoSettings()
    path = Path(input_path).expanduser().absolute()
    if not path.exists():
        raise RawDataError(f"{input_path} does not exist")
    raw: RawDataset | None = None
    try:
        raw = RawDataset.from_path(path)
    except CalypsoError:
        raw = None
    if raw is not None and path.is_dir():
        path = raw.raw_file
        if not path.is_file():
            raise RawDataError(f"{raw.raw_dataset_dir} holds no dataset file {path.name}")
    found, is_bliss = open_mx_scans(path, parameters, scans)
    if parameters.mask is not None:
        mask = read_image(parameters.mask, "mask")
        for scan in found:
            if mask.shape != scan.frame_shape:
                raise ParameterError(
                    f"mask {parameters.mask} has shape {mask.shape}, the images of "
                    f"{scan.description} {scan.frame_shape}"
                )
    require_unmasked(found[0], parameters)
    for scan in found:
        if scan.grid is not None and scan.grid[0] * scan.grid[1] != scan.n_frames:
            raise ParameterError(
                f"{scan.description}: a {scan.grid[0]}x{scan.grid[1]} grid holds "
                f"{scan.grid[0] * scan.grid[1]} images, the scan has {scan.n_frames}; "
                "set grid=[ROWS,COLUMNS]"
            )
    raw_file = str(path) if is_bliss else None
    out = output_folder(input_path, raw, TECHNIQUE, output_dir, settings.processed_data)
    if raw is not None and raw_file is not None:
        raw = raw.model_copy(update={"sample_name": bliss.read_sample_name(raw_file)})
    require_registrable(input_path, raw, raw_file, settings)
    n_frames = sum(scan.n_frames for scan in found)
    # Per image, its row of figures and its spots (a few hundred on a good image), twice:
    # part files, then the report; the images themselves are only linked.
    require_output_room(out, 2 * BYTES_PER_IMAGE * n_frames)
    pixels = found[0].frame_shape[0] * found[0].frame_shape[1]
    stem = path.name.split(".")[0] if path.is_file() else path.name
    return MXPlan(
        input=input_path,
        raw=raw,
        raw_file=raw_file,
        scans=found,
        parameters=parameters,
        output_dir=str(out),
        output_file=str(out / f"{stem}.h5"),
        chunk_size=parameters.chunk_size or default_chunk_size(n_frames, pixels, workers),
    )
