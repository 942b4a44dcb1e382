"""Raw data readers: the data policy's folders, Bliss scans and their Lima files, image
files, spectra, tomography scans and MX images. Raw files are opened read-only, with
HDF5 file locking off (Bliss may still be writing)."""

from __future__ import annotations

import re
from pathlib import Path


def number_order(path: Path) -> list[str | int]:
    """Sort key of files numbered with or without zeros in front: ``proj_2.tif`` before
    ``proj_10.tif``, as their acquisition went (a plain sort puts 10 before 2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
