"""A tomography scan of a 3D phantom, written the way an ESRF beamline writes one.

The phantom is a set of ellipsoids whose line integrals are exact (an
ellipsoid cut at one height is an ellipse, and the projection of an ellipse
has a closed form), so the projections carry no discretisation error and the
voxelised phantom, kept beside the scan, is the ground truth for tests.

The scan reproduces what makes real data hard: darks with an offset pattern and
read noise, flats before and after with a beam that decays and drifts during
the scan (so the flats must be interpolated), Poisson noise, a rotation axis
off the detector centre, and a few pixels whose response changed after the
flats were taken (ring artefacts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import h5py
import numpy as np

from calypso.flows.samples.diffraction import sample_dataset, write_bliss_scan
from calypso.tasks.raw.data_policy import RawDataset

# (density, semi-axes a, b, c, centre x, y, z, rotation about the vertical axis in degrees);
# lengths are fractions of the phantom radius (horizontal) and half-height (vertical).
ELLIPSOIDS: tuple[tuple[float, ...], ...] = (
    (1.0, 0.80, 0.62, 0.92, 0.0, 0.0, 0.0, 10.0),  # body
    (-0.55, 0.70, 0.52, 0.84, 0.0, 0.0, 0.0, 10.0),  # cavity filled with a lighter medium
    (0.9, 0.18, 0.18, 0.30, 0.32, 0.12, 0.25, 0.0),  # dense inclusion
    (-0.35, 0.26, 0.12, 0.40, -0.30, -0.12, -0.15, 35.0),  # pore
    (0.5, 0.08, 0.08, 0.60, -0.05, 0.32, 0.0, 0.0),  # thin vertical fibre
    (0.6, 0.14, 0.06, 0.20, 0.10, -0.30, -0.45, -20.0),  # flat grain
)
DETECTOR = "pco"
ROTATION_MOTOR = "srot"
MU_PER_PIXEL = 0.02  # attenuation of density 1, 1/pixel: 20-40% transmission through the body


@dataclass(frozen=True)
class PhantomGeometry:
    rows: int
    columns: int
    center_of_rotation: float  # detector columns
    radius: float  # phantom radius, pixels

    @property
    def half_height(self) -> float:
        return 0.5 * self.rows

    @classmethod
    def off_axis(cls, rows: int, columns: int, axis_offset: float) -> PhantomGeometry:
        """The axis ``axis_offset`` pixels from the detector centre; the phantom as large
        as stays in the field of view at every angle, with 6 pixels to spare."""
        return cls(
            rows=rows,
            columns=columns,
            center_of_rotation=(columns - 1) / 2 + axis_offset,
            radius=0.5 * columns - abs(axis_offset) - 6,
        )


def project_phantom(geometry: PhantomGeometry, angles: np.ndarray) -> np.ndarray:
    """Exact line integrals (1/pixel * pixel) of the phantom, shape (angles, rows, columns).

    Uses the reconstruction convention of algotom: detector coordinate
    ``s = x cos(a) - y sin(a)`` for a voxel at ``(x, y)`` from the axis.
    """
    g = geometry
    rows = np.arange(g.rows, dtype=np.float64) - (g.rows - 1) / 2
    s = np.arange(g.columns, dtype=np.float64) - g.center_of_rotation
    out = np.zeros((len(angles), g.rows, g.columns), dtype=np.float64)
    theta = -np.asarray(angles, dtype=np.float64)[:, None]  # standard Radon normal angle
    for density, a, b, c, x0, y0, z0, phi in ELLIPSOIDS:
        along = 1 - ((rows - z0 * g.half_height) / (c * g.half_height)) ** 2
        for row in np.flatnonzero(along > 0):
            k = math.sqrt(along[row])
            big, small = a * g.radius * k, b * g.radius * k
            angle = theta - math.radians(phi)
            r2 = (big * np.cos(angle)) ** 2 + (small * np.sin(angle)) ** 2
            shift = s[None, :] - (x0 * g.radius * np.cos(theta) + y0 * g.radius * np.sin(theta))
            inside = np.clip(r2 - shift**2, 0, None)
            out[:, row, :] += density * MU_PER_PIXEL * 2 * big * small * np.sqrt(inside) / r2
    return out


def phantom_volume(geometry: PhantomGeometry, oversample: int = 3) -> np.ndarray:
    """The phantom on the reconstruction grid, shape (rows, columns, columns), 1/pixel.

    Each voxel is the mean of ``oversample``^2 samples across it, so edges
    have the partial-volume values a reconstruction approaches.
    """
    g = geometry
    n = g.columns
    centre = (n - 1) / 2
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    fine = (np.arange(n)[:, None] + offsets[None, :]).ravel() - centre
    y, x = np.meshgrid(fine, fine, indexing="ij")
    volume = np.zeros((g.rows, n, n), dtype=np.float32)
    heights = np.arange(g.rows) - (g.rows - 1) / 2
    for row, z in enumerate(heights):
        image = np.zeros_like(x)
        for density, a, b, c, x0, y0, z0, phi in ELLIPSOIDS:
            along = 1 - ((z - z0 * g.half_height) / (c * g.half_height)) ** 2
            if along <= 0:
                continue
            k = math.sqrt(along)
            cos, sin = math.cos(math.radians(phi)), math.sin(math.radians(phi))
            dx, dy = x - x0 * g.radius, y - y0 * g.radius
            u, v = dx * cos + dy * sin, -dx * sin + dy * cos
            inside = (u / (a * g.radius * k)) ** 2 + (v / (b * g.radius * k)) ** 2 <= 1
            image[inside] += density * MU_PER_PIXEL
        volume[row] = image.reshape(n, oversample, n, oversample).mean(axis=(1, 3))
    return volume


@dataclass(frozen=True)
class TomographySample:
    dataset: RawDataset
    ground_truth: Path
    geometry: PhantomGeometry
    n_projections: int

    @property
    def raw_dataset_dir(self) -> Path:
        return self.dataset.raw_dataset_dir


def _beam_profile(rows: int, columns: int, shift: float) -> np.ndarray:
    """A smooth, slightly off-centre beam (undulator source through optics)."""
    r = (np.arange(rows) - 0.45 * rows - shift) / max(rows, 8)
    c = (np.arange(columns) - 0.52 * columns) / columns
    return np.exp(-(r[:, None] ** 2) / 0.9 - c[None, :] ** 2 / 1.4)


def write_tomography_sample(
    root: Path,
    *,
    rows: int = 32,
    columns: int = 192,
    projections: int = 360,
    axis_offset: float = 7.3,
    flat_counts: float = 30000.0,
    n_darks: int = 10,
    n_flats: int = 15,
    defects: int = 6,
    projection_scans: int = 1,
    seed: int = 0,
    dataset_number: int = 1,
    turn_deg: float = 180.0,
) -> TomographySample:
    """Write a Bliss tomography dataset (darks, flats, projections over ``turn_deg``
    degrees, 180 by default, flats).

    The projections are one scan, or ``projection_scans`` consecutive scans
    (as a sequence split into parts writes them); the frames are the same.

    Parameters
    ----------
    axis_offset : float
        Rotation axis minus detector centre, pixels.
    flat_counts : float
        Counts of the open beam at its brightest, which sets the noise.
    defects : int
        Pixels whose gain drifts by a few percent after the flats (rings).

    The ground truth (the voxelised phantom and the true centre of rotation)
    is written to ``<root>/tomography_ground_truth.h5``, outside RAW_DATA.
    """
    rng = np.random.default_rng(seed)
    geometry = PhantomGeometry.off_axis(rows, columns, axis_offset)
    angles_deg = np.arange(projections) * (turn_deg / projections)
    dark_level = 100.0 + rng.normal(0.0, 4.0, (rows, columns))
    gain = np.ones((rows, columns))
    for _ in range(defects):
        row = int(rng.integers(0, rows))
        column = int(rng.integers(columns // 4, 3 * columns // 4))
        gain[row, column] = 1 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.08)

    # Acquisition order: darks, flats, projections, flats. The beam decays
    # linearly with the frame counter and drifts up by two rows.
    first_projection = n_darks + n_flats
    total = first_projection + projections + n_flats

    def beam(frame: float) -> np.ndarray:
        fraction = frame / total
        return flat_counts * (1 - 0.08 * fraction) * _beam_profile(rows, columns, 2 * fraction)

    def noisy(expected: np.ndarray, key: int) -> np.ndarray:
        frame_rng = np.random.default_rng((seed, key))
        counts = frame_rng.poisson(np.clip(expected, 0, None)) + dark_level
        return np.clip(counts + frame_rng.normal(0.0, 2.0, counts.shape), 0, 65535).astype(
            np.uint16
        )

    flats_before = beam(n_darks + (n_flats - 1) / 2)
    flats_after = beam(first_projection + projections + (n_flats - 1) / 2)

    def projection(index: int) -> np.ndarray:
        line_integrals = project_phantom(geometry, np.radians(angles_deg[index : index + 1]))[0]
        expected = beam(first_projection + index) * gain * np.exp(-line_integrals)
        return noisy(expected, 1000 + index)

    dataset = sample_dataset(root, "phantom", dataset_number)
    common = {"detector": DETECTOR, "frame_shape": (rows, columns), "dtype": "uint16"}
    write_bliss_scan(
        dataset,
        1,
        title="dark images",
        n_frames=n_darks,
        make_frame=lambda i: noisy(np.zeros((rows, columns)), i),
        counters={},
        positioners={ROTATION_MOTOR: 0.0, "sx": 0.0},
        **common,
    )
    write_bliss_scan(
        dataset,
        2,
        title="reference images 1",
        n_frames=n_flats,
        make_frame=lambda i: noisy(flats_before, 100 + i),
        counters={},
        positioners={ROTATION_MOTOR: 0.0, "sx": 2.5},
        **common,
    )
    bounds = np.linspace(0, projections, projection_scans + 1).round().astype(int)
    for part, (first, stop) in enumerate(pairwise(bounds)):
        write_bliss_scan(
            dataset,
            3 + part,
            title=f"projections {first + 1} - {stop}",
            n_frames=int(stop - first),
            make_frame=lambda i, first=first: projection(int(first) + i),
            counters={
                ROTATION_MOTOR: angles_deg[first:stop],
                "elapsed_time": 0.05 * np.arange(first, stop),
            },
            positioners={ROTATION_MOTOR: float(angles_deg[first]), "sx": 0.0},
            frames_per_file=200,
            **common,
        )
    write_bliss_scan(
        dataset,
        3 + projection_scans,
        title="reference images 2",
        n_frames=n_flats,
        make_frame=lambda i: noisy(flats_after, 5000 + i),
        counters={},
        positioners={ROTATION_MOTOR: turn_deg, "sx": 2.5},
        **common,
    )
    truth = Path(root).absolute() / "tomography_ground_truth.h5"
    with h5py.File(truth, "w") as h5:
        h5["volume"] = phantom_volume(geometry)
        h5["volume"].attrs["units"] = "1/pixel"
        h5["center_of_rotation"] = geometry.center_of_rotation
        h5["defect_pixels"] = np.argwhere(gain != 1)
    return TomographySample(
        dataset=dataset, ground_truth=truth, geometry=geometry, n_projections=projections
    )


def write_nxtomo_sample(
    path: Path,
    *,
    rows: int = 8,
    columns: int = 128,
    projections: int = 181,
    axis_offset: float = -4.2,
    seed: int = 1,
) -> PhantomGeometry:
    """An NXtomo file (the layout nxtomomill writes): one detector dataset with
    ``image_key`` (0 projection, 1 flat, 2 dark) and ``sample/rotation_angle``."""
    rng = np.random.default_rng(seed)
    geometry = PhantomGeometry.off_axis(rows, columns, axis_offset)
    angles = np.arange(projections) * (180.0 / projections)
    flat = 20000.0 * _beam_profile(rows, columns, 0.0)
    line_integrals = project_phantom(geometry, np.radians(angles))
    frames = np.concatenate(
        [
            np.zeros((5, rows, columns)),
            np.repeat(flat[None], 5, axis=0),
            flat[None] * np.exp(-line_integrals),
            np.repeat(flat[None], 5, axis=0),
        ]
    )
    frames = rng.poisson(frames) + 90.0
    keys = np.concatenate([np.full(5, 2), np.full(5, 1), np.zeros(projections), np.full(5, 1)])
    rotation = np.concatenate([np.zeros(10), angles, np.full(5, 180.0)])
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry0000")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXtomo"
        detector = entry.create_group("instrument/detector")
        detector.attrs["NX_class"] = "NXdetector"
        detector["data"] = frames.astype(np.uint16)
        detector["image_key"] = keys.astype(np.int32)
        detector["image_key_control"] = keys.astype(np.int32)
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        sample["name"] = "phantom"
        sample["rotation_angle"] = rotation
        sample["rotation_angle"].attrs["units"] = "degree"
    return geometry
