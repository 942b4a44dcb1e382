"""Planning a tomography run: which scan, which rows, which slabs, which backend.

Runs before Prefect or Dask start, on metadata only (shapes, angles, which
series exist), so bad input fails in a second and nothing is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.preflight import require_output_room, require_registrable
from calypso.tasks.raw import bliss
from calypso.tasks.raw.data_policy import RawDataset, output_folder
from calypso.tasks.raw.frames import HDF5_SUFFIXES
from calypso.tasks.raw.projections import TomographyScan, open_tomography_scan
from calypso.techniques import tomography as tomo

TECHNIQUE = "tomography"
# Single-thread FBP cost on this kind of CPU, seconds per (projection x voxel of a slice):
# measured 0.9-1.2 ns with algotom's numba kernel; used only to size the tasks.
FBP_SECONDS_PER_VOXEL_ANGLE = 1.2e-9
TASK_SECONDS_MIN = 3.0  # enough work a task that Prefect's ~0.1 s a task stays a few percent
TASK_SECONDS_MAX = 12.0  # and not so much that memory grows with the volume
TASK_MEMORY_BYTES = 2 * 2**30
READ_SECONDS_PER_PIXEL = 2e-9  # read and decompress (bitshuffle-LZ4) one detector pixel


class TomographyPlan(BaseModel):
    """Everything the flow needs, checked before anything is reconstructed."""

    input: str
    raw: RawDataset | None
    raw_file: str | None
    scan: TomographyScan
    parameters: tomo.TomographyParameters
    first_row: int
    stop_row: int
    chunk_rows: int
    margin: int  # extra rows read either side of a slab (Paganin)
    gpu: bool
    output_dir: str
    output_file: str

    @property
    def n_rows(self) -> int:
        return self.stop_row - self.first_row

    @property
    def preview(self) -> bool:
        return self.parameters.mode == "preview"

    @property
    def preview_rows(self) -> list[int]:
        """The centre and quartile rows of the selected range."""
        picks = [self.first_row + int(self.n_rows * q) for q in (0.25, 0.5, 0.75)]
        return sorted(set(min(max(r, self.first_row), self.stop_row - 1) for r in picks))

    @property
    def preview_binning(self) -> int:
        return self.parameters.preview_binning or max(1, self.scan.columns // 1024)

    @property
    def center_row(self) -> int:
        return self.first_row + self.n_rows // 2

    @property
    def n_slices(self) -> int:
        """Slices the run reconstructs (the preview counts its centre-of-rotation sweep)."""
        if self.preview:
            return len(self.preview_rows) + len(self.parameters.preview_cor_offsets)
        return self.n_rows

    def slabs(self) -> list[tuple[int, int]]:
        return [
            (start, min(start + self.chunk_rows, self.stop_row))
            for start in range(self.first_row, self.stop_row, self.chunk_rows)
        ]

    def read_window(self, first: int, stop: int) -> tuple[int, int]:
        """Rows to read for slab ``first:stop``: the slab and its margin, inside the detector."""
        return max(first - self.margin, 0), min(stop + self.margin, self.scan.rows)


def default_chunk_rows(
    n_rows: int, n_angles: int, width: int, detector_rows: int, workers: int
) -> int:
    """Rows a task: enough work to hide the task's costs, bounded memory, whole rounds.

    * At least ~3 s of reconstruction, so Prefect's ~0.1 s a task is negligible,
      and at least ten times the cost of reading the task's frames: Lima
      writes one HDF5 chunk a frame, so every task decompresses every frame.
    * Otherwise up to ~12 s or half a worker's share, whichever is smaller:
      the task size does not grow with the number of slices, so neither does
      memory, and there are enough tasks to balance the workers.
    * Never more than ~2 GiB of arrays.
    The task count is rounded up to a whole number of rounds of the workers.
    """
    per_slice = max(n_angles * width * width * FBP_SECONDS_PER_VOXEL_ANGLE, 1e-9)
    reading = n_angles * detector_rows * width * READ_SECONDS_PER_PIXEL
    least = max(math.ceil(TASK_SECONDS_MIN / per_slice), math.ceil(10 * reading / per_slice))
    workers = max(workers, 1)
    share = math.ceil(n_rows / (2 * workers))
    bytes_per_row = 4 * (3 * n_angles * width + 2 * width * width)
    cap = max(1, int(TASK_MEMORY_BYTES // bytes_per_row))
    size = min(cap, max(least, min(share, math.floor(TASK_SECONDS_MAX / per_slice))), n_rows)
    tasks = math.ceil(n_rows / max(size, 1))
    if tasks > workers:
        tasks = math.ceil(tasks / workers) * workers
    return max(1, math.ceil(n_rows / tasks))


def output_bytes(scan: TomographyScan, parameters: tomo.TomographyParameters, n_rows: int) -> int:
    """About the disk space of the results: the slices, written once (the slab files become
    the volume the NeXus file links), twice with TIFF; a preview's few binned slices."""
    width = scan.columns
    if parameters.mode == "preview":
        binning = parameters.preview_binning or max(1, width // 1024)
        return 4 * (3 + len(parameters.preview_cor_offsets)) * (width // binning) ** 2
    slices = n_rows * width * width * np.dtype(parameters.output_dtype).itemsize
    return slices * (2 if parameters.tiff else 1)


def read_margin(parameters: tomo.TomographyParameters) -> int:
    """Rows to read either side of a slab: the Paganin filter's reach, none without it."""
    if not parameters.paganin:
        return 0
    # paganin=true makes the model require the three; the fallbacks only give them a type.
    return tomo.paganin_margin(
        energy_kev=parameters.energy_kev or 1.0,
        distance_m=parameters.distance_m or 0.0,
        pixel_size_um=parameters.pixel_size_um or 1.0,
        delta_beta=parameters.delta_beta,
    )


def _resolve_input(input_path: str) -> tuple[RawDataset | None, Path]:
    path = Path(input_path).expanduser().absolute()
    if not path.exists():
        raise RawDataError(f"{input_path} does not exist")
    try:
        raw = RawDataset.from_path(path)
    except CalypsoError:
        raw = None
    if raw is not None and path.is_dir():
        if not raw.raw_file.is_file():
            raise RawDataError(
                f"{raw.raw_dataset_dir} is a raw dataset folder but holds no dataset file "
                f"{raw.raw_file.name}"
            )
        return raw, raw.raw_file
    if path.is_file() and path.suffix.lower() not in (*HDF5_SUFFIXES, ".nx"):
        raise RawDataError(
            f"{path}: expected a raw dataset folder, a Bliss/NXtomo/Data Exchange HDF5 file, "
            "or a folder of projection images"
        )
    return raw, path


def make_tomography_plan(
    input_path: str,
    parameters: tomo.TomographyParameters,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    settings: CalypsoSettings | None = None,
    workers: int = 1,
) -> TomographyPlan:
    """Check the input and parameters and decide the work, before anything runs.

    Raises
    ------
    CalypsoError
        With a message naming the file, scan or parameter at fault.
    """
    raw, path = _resolve_input(input_path)
    scan = open_tomography_scan(path, parameters, scans)
    return plan_for_scan(input_path, raw, path, scan, parameters, output_dir, settings, workers)


def plan_for_scan(
    input_path: str,
    raw: RawDataset | None,
    path: Path,
    scan: TomographyScan,
    parameters: tomo.TomographyParameters,
    output_dir: str | None = None,
    settings: CalypsoSettings | None = None,
    workers: int = 1,
    *,
    check_sampling: bool = True,
) -> TomographyPlan:
    """The plan of a scan already described (``path``: its file or folder): the checks of
    :func:`make_tomography_plan` past the reading of the scan (``check_sampling=False``:
    all but the angular sampling, for the first projections of a live scan)."""
    settings = settings or CalypsoSettings()
    try:
        if check_sampling:
            tomo.check_angular_sampling(
                np.asarray(scan.angles_deg), scan.columns, parameters.min_projections
            )
    except ValueError as exc:
        raise RawDataError(
            f"{scan.description}: {exc}; acquire more projections, or set min_projections=N "
            "to reconstruct from these anyway"
        ) from None
    first, stop = parameters.rows if parameters.rows is not None else (0, scan.rows)
    if stop > scan.rows:
        raise ParameterError(
            f"rows={[first, stop]} reaches beyond the detector, which has {scan.rows} rows "
            f"(0-{scan.rows - 1}) in {scan.description}"
        )
    if parameters.center_of_rotation is not None and not (
        0 <= parameters.center_of_rotation < scan.columns
    ):
        raise ParameterError(
            f"center_of_rotation={parameters.center_of_rotation} is outside the detector "
            f"(0-{scan.columns - 1} columns)"
        )
    if parameters.algorithm == "gridrec" and not tomo.tomopy_available():
        raise ParameterError(
            "algorithm=gridrec needs tomopy, which is not installed (it is not on PyPI: "
            "`conda install -c conda-forge tomopy`); use algorithm=fbp (the default) or dfi"
        )
    gpu = bool(parameters.gpu) if parameters.gpu is not None else tomo.gpu_available()
    if parameters.gpu and not tomo.gpu_available():
        raise ParameterError(
            "gpu=true but numba finds no CUDA GPU on this machine; unset gpu to use the CPU"
        )
    gpu = gpu and parameters.algorithm == "fbp"
    out = output_folder(input_path, raw, TECHNIQUE, output_dir, settings.processed_data)
    raw_file = str(path) if scan.layout == "bliss" else None
    if raw is not None and raw_file is not None:
        raw = raw.model_copy(update={"sample_name": bliss.read_sample_name(raw_file)})
    require_registrable(input_path, raw, raw_file, settings)
    require_output_room(out, output_bytes(scan, parameters, stop - first))
    stem = path.stem if path.is_file() else path.name
    n_rows = stop - first
    chunk = parameters.chunk_rows or default_chunk_rows(
        n_rows, scan.n_projections, scan.columns, scan.rows, workers
    )
    return TomographyPlan(
        input=input_path,
        raw=raw,
        raw_file=raw_file,
        scan=scan,
        parameters=parameters,
        first_row=first,
        stop_row=stop,
        chunk_rows=min(chunk, n_rows),
        margin=read_margin(parameters),
        gpu=gpu,
        output_dir=str(out),
        output_file=str(out / f"{stem}{'_preview' if parameters.mode == 'preview' else ''}.h5"),
    )
