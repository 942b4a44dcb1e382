"""Reconstruction of slices from sinograms: FBP (CPU or CUDA), DFI and gridrec backends.

The kernels come from algotom (numba FBP on CPU or CUDA, DFI) and, when it is
installed, tomopy's gridrec through algotom's wrapper. Slices are
``volume[row, y, x]`` on a square grid as wide as the detector, centred on the
rotation axis, in 1/pixel for absorption data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np

ALGORITHMS = ("fbp", "dfi", "gridrec")

#: How far apart (pixels) two neighbouring projections may be at the edge of the field of
#: view. Full angular sampling (Crowther's criterion; Kak & Slaney, ch. 5) is 1 pixel: pi/2
#: projections per detector column over 180 degrees. Real scans are often sparser: fast and
#: time-resolved scans at a quarter to a tenth of it still give usable slices, with streaks
#: that grow as projections get fewer; at 16 pixels (1/16 of full sampling, e.g. fewer than
#: 64 projections over 180 degrees for 640 columns, 203 for 2048) the streaks are as strong
#: as the sample and the volume only looks like a result. Such a scan is refused unless
#: ``min_projections`` says that fewer are meant (sparse-view work).
MAX_EDGE_ARC_PX = 16.0


def max_angular_step_deg(width: int) -> float:
    """The largest step between projections (degrees) for a ``width``-pixel-wide
    reconstruction: :data:`MAX_EDGE_ARC_PX` at the edge of the field of view."""
    return math.degrees(2.0 * MAX_EDGE_ARC_PX / max(width, 1))


def check_angular_sampling(
    angles_deg: np.ndarray, width: int, min_projections: int | None = None
) -> None:
    """Refuse projections too few for a ``width``-pixel-wide reconstruction.

    Parameters
    ----------
    angles_deg : ndarray
        The projection angles, in acquisition order.
    width : int
        Detector columns (the reconstruction grid is ``width`` x ``width``).
    min_projections : int, optional
        When given, the only rule: at least this many projections.

    Raises
    ------
    ValueError
        Saying how many projections there are and how many are needed.

    Examples
    --------
    >>> check_angular_sampling(np.linspace(0, 179, 181), 640)
    >>> check_angular_sampling(np.array([0.0, 90.0]), 640)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: 2 projections over 90.0 degrees, 90 degrees apart: ...
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    n = len(angles)
    if min_projections is not None:
        if n < min_projections:
            raise ValueError(f"{n} projections, fewer than min_projections={min_projections}")
        return
    covered = float(abs(angles[-1] - angles[0])) if n > 1 else 0.0
    step = covered / (n - 1) if n > 1 else math.inf
    largest = max_angular_step_deg(width)
    if step > largest:
        needed = math.ceil(covered / largest) + 1 if covered else 2
        raise ValueError(
            f"{n} projections over {covered:.1f} degrees, {step:.3g} degrees apart: a "
            f"{width}-pixel-wide reconstruction needs them at most {largest:.3g} degrees apart "
            f"({needed} over this range), or its slices show streaks rather than the sample"
        )


def gpu_available() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba without CUDA support, no driver ...
        return False


@cache
def serial_back_projection() -> Callable[..., np.ndarray]:
    """algotom's CPU back-projection kernel, compiled without parallel loops."""
    import numba
    from algotom.rec.reconstruction import back_projection_cpu

    return numba.njit(nogil=True)(back_projection_cpu.py_func)


def back_projection_kernel() -> Callable[..., np.ndarray]:
    """The CPU back-projection kernel to use in this process.

    algotom compiles its kernel with ``parallel=True`` and a ``prange`` over
    angles that adds every angle into the same image without synchronisation:
    with more than one numba thread, updates are lost and the slice changes
    from run to run (measured: 1-3% of the values). Where numba runs one
    thread (``NUMBA_NUM_THREADS=1``, as in Calypso's Dask workers) no race is
    possible and algotom's kernel is used as compiled; elsewhere the same
    kernel compiled serially, which gives identical values but runs ~1.6 times
    slower here. Calypso never changes numba's thread count itself: numba
    refuses a count that changes once its threads have started.
    """
    import numba

    if numba.get_num_threads() == 1:
        from algotom.rec.reconstruction import back_projection_cpu

        return back_projection_cpu
    return serial_back_projection()


def filtered_back_projection(
    sinograms: np.ndarray,
    angles: np.ndarray,
    center: float,
    filter_name: str | None,
    circle_mask: bool,
) -> np.ndarray:
    """FBP with algotom's ramp filter (padded by 15% of the width, at most 150 pixels)
    and its back-projection kernel run serially; shape (rows, columns, columns)."""
    from algotom.rec.reconstruction import apply_ramp_filter, make_2d_ramp_window
    from algotom.util.utility import make_circle_mask

    n_angles, n_rows, width = sinograms.shape
    pad = min(int(0.15 * width), 150)
    ramp = make_2d_ramp_window(n_angles, width + 2 * pad, filter_name)
    back_project = back_projection_kernel()
    weight = np.float32(math.pi / n_angles)  # Riemann sum over a half or full turn
    if circle_mask:
        weight = weight * make_circle_mask(width, 1.0).astype(np.float32)
    angles32, center32 = np.float32(angles), np.float32(center)
    volume = np.empty((n_rows, width, width), dtype=np.float32)
    for row in range(n_rows):
        filtered = apply_ramp_filter(sinograms[:, row, :], ramp, filter_name, pad, "edge")
        volume[row] = back_project(np.float32(filtered), angles32, center32, False) * weight
    return volume


def reconstruct(
    sinograms: np.ndarray,
    angles: np.ndarray,
    center: float,
    *,
    algorithm: str = "fbp",
    filter_name: str | None = "hann",
    circle_mask: bool = True,
    gpu: bool = False,
) -> np.ndarray:
    """Reconstruct slices from sinograms of line integrals.

    Parameters
    ----------
    sinograms : ndarray, shape (angles, rows, columns)
    angles : ndarray, shape (angles,)
        Radians.
    center : float
        Rotation axis, in columns.
    algorithm : {"fbp", "dfi", "gridrec"}
        algotom's FBP or DFI, or tomopy's gridrec (through algotom's wrapper).
    filter_name : str or None
        Smoothing window of the ramp filter.
    circle_mask : bool
        Zero the pixels outside the field of view.
    gpu : bool
        FBP on CUDA (numba) instead of the CPU.

    Returns
    -------
    ndarray of float32, shape (rows, columns, columns)
        Attenuation coefficient per pixel (1/pixel) for absorption data.
    """
    from algotom.rec import reconstruction as rec

    sinograms = np.ascontiguousarray(sinograms, dtype=np.float32)
    n_angles, _, width = sinograms.shape
    if not 0 <= center < width:
        raise ValueError(f"centre of rotation {center:.2f} is outside the detector (0-{width})")
    common = {"angles": angles, "ratio": 1.0 if circle_mask else None, "apply_log": False}
    if algorithm == "fbp" and not gpu:
        return filtered_back_projection(sinograms, angles, center, filter_name, circle_mask)
    if algorithm == "fbp":
        volume = rec.fbp_reconstruction(
            sinograms, center, filter_name=filter_name, gpu=True, ncore=1, **common
        )
        # algotom weighs each projection by pi/(n-1); the Riemann sum of a uniform
        # half or full turn is pi/n, which keeps the values quantitative.
        volume *= (n_angles - 1) / n_angles
    elif algorithm == "dfi":
        volume = rec.dfi_reconstruction(
            sinograms, center, filter_name=filter_name, ncore=1, **common
        )
    elif algorithm == "gridrec":
        volume = rec.gridrec_reconstruction(
            sinograms, center, filter_name=filter_name or "shepp", ncore=1, **common
        )
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}: expected one of {ALGORITHMS}")
    return np.ascontiguousarray(np.moveaxis(np.asarray(volume, dtype=np.float32), 1, 0))


def tomopy_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tomopy") is not None
