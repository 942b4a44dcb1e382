"""A simulated MX grid scan (X-ray centring) written as a Bliss dataset.

Stills of one thaumatin crystal (P4₁2₁2, a = b = 57.8 Å, c = 150.2 Å) that
fills part of the grid: every cell sees the same orientation, scaled by how
much crystal is in the beam there. Reflections are the reciprocal lattice
points near the Ewald sphere, projected on a flat Eiger-like detector (module
gaps read 2³²−1, as Eiger does, with a ``pixel_mask``) as Gaussian spots on a
solvent-ring background with Poisson noise. A few frames carry ice rings; a
hot-pixel cluster sits under the beamstop mask. The true spot positions are
written beside the scan for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fabio
import h5py
import numpy as np
from scipy import ndimage

from calypso.flows.samples.diffraction import sample_dataset, write_bliss_scan
from calypso.tasks.raw.data_policy import RawDataset
from calypso.techniques.mx import DetectorGeometry

CELL_A = (57.8, 57.8, 150.2)  # thaumatin, tetragonal
DETECTOR = "eiger"
INVALID = np.uint32(2**32 - 1)
SPOT_SIGMA_PX = 0.9
MIN_TRUE_INTENSITY = 150.0  # counts in a spot: weaker reflections are not drawn


@dataclass(frozen=True)
class MXSample:
    dataset: RawDataset
    ground_truth: Path
    mask: Path
    grid: tuple[int, int]
    crystal_cell: tuple[int, int]
    ice_frames: tuple[int, ...]

    @property
    def raw_dataset_dir(self) -> Path:
        return self.dataset.raw_dataset_dir


def eiger_shape(modules: tuple[int, int], module: tuple[int, int]) -> tuple[int, int]:
    """Frame shape of ``modules`` (rows, columns) of ``module`` pixels with Eiger gaps."""
    return modules[0] * module[0] + 37 * (modules[0] - 1), modules[1] * module[1] + 10 * (
        modules[1] - 1
    )


def eiger_gaps(shape: tuple[int, int], module: tuple[int, int]) -> np.ndarray:
    """True on the gaps between modules (37 rows, 10 columns wide)."""
    rows, columns = np.indices(shape)
    return (rows % (module[0] + 37) >= module[0]) | (columns % (module[1] + 10) >= module[1])


def reflections(
    geometry: DetectorGeometry,
    shape: tuple[int, int],
    rng: np.random.Generator,
    d_min: float,
    bandwidth: float = 0.0025,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detector positions (x, y) and relative intensities of a random crystal orientation."""
    from scipy.spatial.transform import Rotation

    a, b, c = CELL_A
    limit = [int(cell / d_min) + 1 for cell in (a, b, c)]
    indices = np.meshgrid(*[np.arange(-n, n + 1) for n in limit], indexing="ij")
    hkl = np.stack([axis.ravel() for axis in indices], axis=1).astype(np.float64)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    reciprocal = hkl / np.array([a, b, c])
    s = np.linalg.norm(reciprocal, axis=1)
    hkl, reciprocal, s = hkl[s < 1 / d_min], reciprocal[s < 1 / d_min], s[s < 1 / d_min]
    lattice = Rotation.random(random_state=rng).apply(reciprocal)
    wavenumber = 1 / geometry.wavelength_a
    scattered = lattice + np.array([0.0, 0.0, wavenumber])
    excitation = np.linalg.norm(scattered, axis=1) - wavenumber
    near = (np.abs(excitation) < bandwidth) & (scattered[:, 2] > 0)
    scattered, s, excitation = scattered[near], s[near], excitation[near]
    pixel = geometry.pixel_size_um * 1e-6
    x = geometry.beam_x_px + geometry.distance_m * scattered[:, 0] / scattered[:, 2] / pixel
    y = geometry.beam_y_px + geometry.distance_m * scattered[:, 1] / scattered[:, 2] / pixel
    # Wilson falloff (B = 20 Å^2), exponential statistics, partiality from the excitation error.
    intensity = (
        rng.exponential(1.0, len(s))
        * np.exp(-20.0 * s**2 / 2)
        * np.exp(-((excitation / bandwidth) ** 2) * 2)
    )
    inside = (x > 4) & (x < shape[1] - 5) & (y > 4) & (y < shape[0] - 5)
    return x[inside], y[inside], intensity[inside]


def _separated(x: np.ndarray, y: np.ndarray, order: np.ndarray, spacing: float) -> np.ndarray:
    """Indices (strongest first) of spots at least ``spacing`` px from every stronger one."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([x[order], y[order]]))
    taken = np.zeros(len(order), dtype=bool)
    for rank, neighbours in enumerate(tree.query_ball_point(tree.data, r=spacing)):
        taken[rank] = not any(taken[j] for j in neighbours if j < rank)
    return order[taken]


def write_mx_sample(
    root: Path,
    *,
    grid: tuple[int, int] = (5, 7),
    modules: tuple[int, int] = (2, 2),
    module: tuple[int, int] = (256, 512),
    crystal_at: tuple[float, float] = (1.6, 4.3),
    crystal_size: float = 1.3,
    ice_frames: tuple[int, ...] = (5, 19),
    frames_per_file: int = 100,
    seed: int = 0,
    dataset_number: int = 1,
) -> MXSample:
    """Write a Bliss grid scan (``amesh``) of diffraction stills and its ground truth.

    Parameters
    ----------
    grid : (rows, columns)
        Grid points; the fast motor ``sy`` runs along a row.
    crystal_at : (row, column)
        Where the crystal's centre is, in grid cells (need not be a cell centre).
    crystal_size : float
        Gaussian width of the crystal's diffracting volume, in cells.
    ice_frames : tuple of int
        Frames with ice rings.
    """
    rng = np.random.default_rng(seed)
    shape = eiger_shape(modules, module)
    geometry = DetectorGeometry(
        beam_x_px=shape[1] / 2 + 7.3,
        beam_y_px=shape[0] / 2 - 5.6,
        distance_m=0.06 * max(shape) / 1034,
        wavelength_a=0.9763,
        pixel_size_um=75.0,
    )
    gaps = eiger_gaps(shape, module)
    d_image = geometry.d_spacing_image(shape)
    inverse_d2 = 1 / d_image**2
    background = 2.0 + 14.0 * np.exp(-(((inverse_d2 - 1 / 3.25**2) / 0.035) ** 2))
    ice = np.zeros(shape)
    for ring in (3.897, 3.669, 3.441):
        ice += 60.0 * np.exp(-(((d_image - ring) / (0.004 * ring)) ** 2))
    from_beam = (
        np.indices(shape) - np.array([geometry.beam_y_px, geometry.beam_x_px])[:, None, None]
    )
    angle = np.arctan2(from_beam[0], from_beam[1])
    ice *= 0.6 + 0.4 * np.cos(7 * angle) ** 2  # grainy, as real ice rings are
    d_edge = float(d_image[~gaps].min())
    x, y, strength = reflections(geometry, shape, rng, d_min=max(d_edge, 1.5))
    mask = np.zeros(shape, dtype=np.int8)
    beamstop = np.hypot(from_beam[0], from_beam[1]) < 12
    mask[beamstop] = 1
    hot = (int(geometry.beam_y_px) - 25, int(geometry.beam_x_px) - 22)  # ~24 Å: in range
    mask[hot[0] : hot[0] + 2, hot[1] : hot[1] + 2] = 1

    rows, columns = grid
    cell_rows, cell_columns = np.divmod(np.arange(rows * columns), columns)
    amount = np.exp(
        -((cell_rows - crystal_at[0]) ** 2 + (cell_columns - crystal_at[1]) ** 2)
        / (2 * crystal_size**2)
    )
    scale = 6000.0
    # Spots whose 5x5 core touches a gap or the beamstop are not drawn: a spot finder
    # cannot be asked to find them.
    blocked = ndimage.binary_dilation(gaps | beamstop, iterations=3)
    usable = ~blocked[y.round().astype(int), x.round().astype(int)]
    order = np.argsort(-strength)
    order = order[usable[order]]
    separated = _separated(x, y, order, spacing=5.0)
    truth: list[tuple[int, float, float, float]] = []

    def make_frame(index: int) -> np.ndarray:
        frame_rng = np.random.default_rng((seed, index))
        expected = background.copy()
        if index in ice_frames:
            expected += ice
        counts = scale * amount[index] * strength[separated]
        drawn = separated[counts >= MIN_TRUE_INTENSITY]
        for spot, total in zip(drawn, counts[counts >= MIN_TRUE_INTENSITY], strict=True):
            cx, cy = x[spot], y[spot]
            r0, c0 = int(cy) - 3, int(cx) - 3
            rr, cc = np.mgrid[r0 : r0 + 8, c0 : c0 + 8]
            profile = np.exp(-((rr - cy) ** 2 + (cc - cx) ** 2) / (2 * SPOT_SIGMA_PX**2))
            expected[r0 : r0 + 8, c0 : c0 + 8] += total * profile / profile.sum()
            truth.append((index, float(cx), float(cy), float(total)))
        frame = frame_rng.poisson(expected).astype(np.uint32)
        frame[hot[0] : hot[0] + 2, hot[1] : hot[1] + 2] = 5000  # masked hot pixels
        frame[gaps] = INVALID
        return frame

    dataset = sample_dataset(root, "thaumatin", dataset_number)
    span = (0.02 * (columns - 1), 0.02 * (rows - 1))
    sy = np.tile(np.linspace(-span[0] / 2, span[0] / 2, columns), rows)
    sz = np.repeat(np.linspace(-span[1] / 2, span[1] / 2, rows), columns)

    def detector_metadata(instrument: h5py.Group, measurement: h5py.Group) -> None:
        group = instrument[DETECTOR]
        group["beam_center_x"] = geometry.beam_x_px
        group["beam_center_y"] = geometry.beam_y_px
        group["detector_distance"] = geometry.distance_m
        group["x_pixel_size"] = geometry.pixel_size_um * 1e-6
        group["y_pixel_size"] = geometry.pixel_size_um * 1e-6
        group["pixel_mask"] = gaps.astype(np.uint32)
        beam = instrument.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam["incident_wavelength"] = geometry.wavelength_a
        beam["incident_wavelength"].attrs["units"] = "angstrom"

    write_bliss_scan(
        dataset,
        1,
        title=f"amesh sy {sy.min():g} {sy.max():g} {columns - 1} sz {sz.min():g} {sz.max():g} "
        f"{rows - 1} 0.02",
        detector=DETECTOR,
        frame_shape=shape,
        n_frames=rows * columns,
        make_frame=make_frame,
        counters={"sy": sy, "sz": sz},
        positioners={"phi": 0.0},
        frames_per_file=frames_per_file,
        dtype="uint32",
        exposure_s=0.02,
        extra_detector=detector_metadata,
    )
    truth_path = Path(root).absolute() / "mx_ground_truth.h5"
    table = np.array(truth, dtype=np.float64).reshape(-1, 4)
    with h5py.File(truth_path, "w") as h5:
        h5["frame"] = table[:, 0].astype(int)
        h5["x"], h5["y"], h5["intensity"] = table[:, 1], table[:, 2], table[:, 3]
        h5["ice_frames"] = np.array(ice_frames, dtype=int)
        h5["crystal_at"] = np.array(crystal_at)
    mask_path = dataset.session_dir / "SCRIPTS" / "eiger_beamstop_mask.edf"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    fabio.edfimage.EdfImage(data=mask).write(str(mask_path))
    return MXSample(
        dataset=dataset,
        ground_truth=truth_path,
        mask=mask_path,
        grid=grid,
        crystal_cell=(round(crystal_at[0]), round(crystal_at[1])),
        ice_frames=tuple(ice_frames),
    )
