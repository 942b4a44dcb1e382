"""What the live chunk tasks of every technique share (docs/live.md): reading the frames
of a scan in progress where they lie, and the partial result people open while it runs.

A live chunk travels as the Lima files that hold its frames (``(file, dataset, index,
stop)`` runs from :meth:`~calypso.tasks.raw.live.LiveScan.locations`): the dataset file's
virtual dataset does not exist before the scan ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from calypso.errors import RawDataError
from calypso.tasks.raw.lima_saving import iter_run
from calypso.tasks.raw.live import FileRun
from calypso.tasks.writers import nexus


def frames_of(runs: list[FileRun], frame_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """One frame at a time (a task's memory stays at one frame), as offline chunks read,
    a read that fails naming the Lima file and the frames. A frame not of the scan's
    ``frame_shape`` is refused by name (one image a file: any file may be another's)."""
    for run in runs:
        for frame in iter_run(*run):
            if frame.shape != tuple(frame_shape):
                raise RawDataError(
                    f"{run[0]} holds a frame of shape {frame.shape}, the scan's are "
                    f"{tuple(frame_shape)}: it belongs to another detector or scan"
                )
            yield frame


def partial_path(output_file: str | Path) -> Path:
    """Where the partial result of a live run is, next to the result to come:
    ``<name>.partial.h5`` (removed once the result is published)."""
    output = Path(output_file)
    return output.with_name(f"{output.stem}.partial.h5")


@contextmanager
def partial_file(path: Path, entry: str) -> Iterator[h5py.File]:
    """A new partial result at ``path``: written aside, then renamed onto ``path`` only
    once whole, so a reader opening it at any time (h5py, silx view) finds a whole file;
    marked partial (root ``status``) with entry ``entry`` as its default."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as h5:
            nexus.write_root_attributes(h5, entry)
            h5.attrs["status"] = "partial"
            yield h5
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
