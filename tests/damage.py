"""Damaging raw data the way transfers and disks do, for tests of what a run does then."""

from __future__ import annotations

from pathlib import Path

import h5py

from calypso.tasks.raw import number_order


def damage_stored_frame(raw_dataset_dir: Path, frame: int, detector: str = "pilatus1m") -> Path:
    """Overwrite bytes inside the stored (compressed) chunk of scan 1's ``frame`` in its
    Lima file: the planner's checks pass, the chunk task that reads the frame fails."""
    first = 0
    for lima in sorted((raw_dataset_dir / "scan0001").glob(f"{detector}_*.h5"), key=number_order):
        with h5py.File(lima, "r") as h5:
            data = h5["entry_0000/measurement/data"]
            if frame < first + len(data):
                chunk = data.id.get_chunk_info(frame - first)
                break
            first += len(data)
    else:
        raise ValueError(f"scan 1 of {raw_dataset_dir} has no frame {frame}")
    with open(lima, "r+b") as stream:
        stream.seek(chunk.byte_offset + chunk.size // 3)
        stream.write(bytes(256))
    return lima
