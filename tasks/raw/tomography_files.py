"""Tomography scans of NXtomo and Data Exchange files.

* **NXtomo** (nxtomomill at ESRF, Diamond's ``entry1/tomo_entry``, other NeXus writers):
  one detector dataset whose frames are told apart by ``image_key_control`` /
  ``image_key`` (0 projection, 1 flat, 2 dark, 3 invalid), and a rotation angle for
  every frame (or every projection).
* **Data Exchange** (APS, tomopy's ``dxchange``): ``/exchange/data``, ``data_white``,
  ``data_dark`` and ``theta``; files of APS's tomoScan may give the rotation's start,
  step and count instead of ``theta`` and a dark level instead of dark images.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict

from calypso.errors import RawDataError
from calypso.tasks.raw import bliss
from calypso.tasks.raw.frames import hdf5_frame_source
from calypso.tasks.raw.projections import IMAGE_KEY, FrameBlock, TomographyScan

# Where NXtomo writers put things: the standard and nxtomomill (ESRF) under the entry's
# instrument/detector and sample; Diamond's entry1/tomo_entry (an NXsubentry) keeps its
# frames and angles in data/ as well, and newer writers the angle among the sample's
# transformations.
NXTOMO_FRAMES = ("instrument/detector/data", "data/data")
NXTOMO_KEYS = ("instrument/detector/image_key_control", "instrument/detector/image_key")
NXTOMO_ANGLES = (
    "sample/rotation_angle",
    "data/rotation_angle",
    "sample/transformations/rotation_angle",
)


class NXtomoEntry(BaseModel):
    """Where an NXtomo entry keeps its frames, their image keys and rotation angles."""

    model_config = ConfigDict(frozen=True)

    entry: str
    frames: str
    keys: str | None  # None: an NXtomo entry of projections only
    angles: str | None


def _is_nxtomo(group: h5py.Group) -> bool:
    definition = group.attrs.get("definition", group.get("definition"))
    if isinstance(definition, h5py.Dataset):
        definition = definition[()]
    if isinstance(definition, np.ndarray):
        definition = definition.ravel()[0] if definition.size else b""
    if isinstance(definition, bytes):
        definition = definition.decode(errors="replace")
    return str(definition).strip() == "NXtomo"


def _first_dataset(group: h5py.Group, names: tuple[str, ...], ndim: int | None = None):
    for name in names:
        try:
            item = group.get(name)
        except (KeyError, OSError):  # a broken external link
            continue
        if isinstance(item, h5py.Dataset) and (ndim is None or item.ndim == ndim):
            return f"{group.name}/{name}"
    return None


def _subgroups(group: h5py.Group) -> list[h5py.Group]:
    found = []
    for name in group:
        try:
            item = group.get(name)
        except (KeyError, OSError):  # a broken external link
            continue
        if isinstance(item, h5py.Group):
            found.append(item)
    return found


def nxtomo_entry(h5: h5py.File) -> NXtomoEntry | None:
    """The first NXtomo entry, at the top or one level down (Diamond's tomo_entry)."""
    groups = _subgroups(h5)
    children = [child for top in groups for child in _subgroups(top)]
    for group in groups + children:
        frames = _first_dataset(group, NXTOMO_FRAMES, ndim=3)
        keys = _first_dataset(group, NXTOMO_KEYS, ndim=1)
        if frames and (keys or _is_nxtomo(group)):
            return NXtomoEntry(
                entry=group.name.lstrip("/"),
                frames=frames,
                keys=keys,
                angles=_first_dataset(group, NXTOMO_ANGLES),
            )
    return None


def _angles_in_degrees(dataset: h5py.Dataset) -> np.ndarray:
    values = np.asarray(dataset[()], dtype=np.float64).ravel()
    units = dataset.attrs.get("units", b"")
    units = units.decode() if isinstance(units, bytes) else str(units)
    radians_by_size = values.size and np.abs(values).max() <= 2 * math.pi + 0.1
    if units.lower().startswith("rad") or (not units and radians_by_size):
        return np.degrees(values)
    return values


def _runs(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """(key, start, stop) of each run of equal keys."""
    edges = np.flatnonzero(np.diff(keys)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(keys)]])
    return [(int(keys[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def nxtomo_scan(path: Path, where: NXtomoEntry) -> TomographyScan:
    """The NXtomo entry ``where`` (:func:`nxtomo_entry`): frames tagged by image key, a
    rotation angle for every frame or every projection."""
    with bliss.open_raw(path) as h5:
        keys = np.asarray(h5[where.keys][()]) if where.keys else None
        all_angles = _angles_in_degrees(h5[where.angles]) if where.angles else None
    source = hdf5_frame_source(path, where.frames)
    if keys is None:  # projections only (NXtomo without image keys)
        keys = np.zeros(source.n_frames, dtype=int)
    elif not np.all(np.isfinite(keys)):  # Diamond writes its keys as floats
        raise RawDataError(f"{path}: {where.keys} holds NaN or infinite values")
    keys = keys.astype(int)
    if len(keys) != source.n_frames:
        raise RawDataError(
            f"{path}: {where.keys} has {len(keys)} values for {source.n_frames} frames"
        )
    n_projections = int(np.count_nonzero(keys == IMAGE_KEY["projection"]))
    if all_angles is not None and len(all_angles) not in (len(keys), n_projections):
        raise RawDataError(
            f"{path}: {where.angles} has {len(all_angles)} values for {len(keys)} frames "
            f"({n_projections} projections)"
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
            if all_angles is not None and len(all_angles) == len(keys):
                angles.extend(all_angles[start:stop].tolist())
            projections.append(block)
    if all_angles is not None and len(all_angles) != len(keys):  # the projections' own
        angles = all_angles.tolist()
    return TomographyScan(
        layout="nxtomo",
        description=f"{path}::/{where.entry}",
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
        angles = _dxchange_angles(h5)
        # Files of APS's tomoScan without darks record the camera's dark level instead.
        dark_level = (
            None if darks else _scalar(h5, f"{DX_ACQUISITION}/dark_fields/dark_field_value")
        )
    return TomographyScan(
        layout="dxchange",
        description=str(path),
        darks=[darks] if darks else [],
        flats=[flats] if flats else [],
        projections=[projections],
        angles_deg=list(angles),
        dark_level=dark_level,
    )


DX_ACQUISITION = "/process/acquisition"


def _scalar(h5: h5py.File, name: str) -> float | None:
    item = h5.get(name)
    if not isinstance(item, h5py.Dataset) or item.size == 0:
        return None
    try:
        return float(np.asarray(item[()], dtype=np.float64).ravel()[0])
    except (TypeError, ValueError):
        return None


def _dxchange_angles(h5: h5py.File) -> list[float]:
    """``/exchange/theta``; or, as APS's tomoScan records them, the rotation's start, step
    and number of angles (degrees)."""
    if "/exchange/theta" in h5:
        return _angles_in_degrees(h5["/exchange/theta"]).tolist()
    rotation = f"{DX_ACQUISITION}/rotation"
    start, step = (
        _scalar(h5, f"{rotation}/rotation_start"),
        _scalar(h5, f"{rotation}/rotation_step"),
    )
    count = _scalar(h5, f"{rotation}/num_angles")
    if start is None or step is None or count is None:
        return []
    return (start + step * np.arange(int(count))).tolist()
