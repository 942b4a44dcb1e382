"""Benchmark: FBP on the GPU (``gpu=true``) versus the CPU kernel, on the same sinograms.

    python tests/benchmarks/bench_tomography_gpu.py [--rows 8] [--columns 2048]
        [--projections 1800] [--workers N]

1. Projects the analytic phantom (flows/samples/tomography.py) into ROWS sinograms
   of COLUMNS pixels over PROJECTIONS angles of a half turn: line integrals, as
   the flow hands them to the reconstruction.
2. Times ``reconstruct(..., gpu=True)`` (algotom's CUDA kernel through numba,
   ramp filter on the CPU) after one warm-up call that compiles the kernel, and
   the ramp filter alone, which is the CPU part of the GPU path.
3. Times the CPU kernel as Calypso's Dask workers run it: one numba thread a
   process, a pool of WORKERS spawned processes (default: every core), each
   warmed up first.
4. Prints slices/s of each, the ratio GPU / CPU pool and GPU / one CPU core,
   and the largest difference between the two volumes against the volume's
   range (they must agree: the GPU kernel is algotom's, in float32 on the card).

Needs numba with CUDA and an NVIDIA GPU; without one it says so and exits 2.
The machine may be shared: compare the ratios printed, not absolute times.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

_SINOGRAMS = None  # (sinograms, angles, centre) in each pool process, loaded by _load


def _load(path: str, angles: str, center: float) -> None:
    global _SINOGRAMS
    _SINOGRAMS = (np.load(path), np.load(angles), center)


def _reconstruct_row(row: int) -> np.ndarray:
    from calypso.techniques.tomography import reconstruct

    sinograms, angles, center = _SINOGRAMS
    return reconstruct(sinograms[:, row : row + 1], angles, center)[0]


def cpu_pool(sinograms: np.ndarray, angles: np.ndarray, center: float, workers: int):
    """The CPU kernel, one row a task, in ``workers`` spawned one-thread processes."""
    work = Path(tempfile.mkdtemp(prefix="calypso-bench-gpu-"))
    np.save(work / "sinograms.npy", sinograms)
    np.save(work / "angles.npy", angles)
    rows = sinograms.shape[1]
    context = multiprocessing.get_context("spawn")
    arguments = (str(work / "sinograms.npy"), str(work / "angles.npy"), center)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_load,
                             initargs=arguments) as pool:  # fmt: skip
        list(pool.map(_reconstruct_row, [0] * workers))  # load and compile everywhere
        began = time.perf_counter()
        volume = np.stack(list(pool.map(_reconstruct_row, range(rows))))
        seconds = time.perf_counter() - began
    return volume, seconds


def main() -> int:
    # As in Calypso's Dask workers: one numba thread a process, set before numba loads.
    os.environ["NUMBA_NUM_THREADS"] = "1"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--projections", type=int, default=1800)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from calypso.flows.samples.tomography import PhantomGeometry, project_phantom
    from calypso.techniques import tomography as tomo
    from calypso.techniques.tomography.reconstruction import filtered_back_projection

    if not tomo.gpu_available():
        print("no CUDA GPU found by numba: nothing to compare on this machine", file=sys.stderr)
        return 2
    n = args.columns
    geometry = PhantomGeometry(
        rows=args.rows, columns=n, center_of_rotation=(n - 1) / 2 + 0.04 * n, radius=0.4 * n
    )
    angles = np.radians(np.arange(args.projections) * 180.0 / args.projections)
    began = time.perf_counter()
    sinograms = np.ascontiguousarray(project_phantom(geometry, angles), dtype=np.float32)
    print(
        f"{args.rows} sinograms of {n} columns x {args.projections} projections "
        f"({sinograms.nbytes / 2**20:.0f} MiB) projected in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    center = geometry.center_of_rotation

    tomo.reconstruct(sinograms[:, :1], angles, center, gpu=True)  # compile the kernel
    began = time.perf_counter()
    on_gpu = tomo.reconstruct(sinograms, angles, center, gpu=True)
    gpu_seconds = time.perf_counter() - began

    # The ramp filter is the CPU share of the GPU path: time it alone.
    from algotom.rec.reconstruction import apply_ramp_filter, make_2d_ramp_window

    pad = min(int(0.15 * n), 150)
    ramp = make_2d_ramp_window(args.projections, n + 2 * pad, "hann")
    began = time.perf_counter()
    for row in range(args.rows):
        apply_ramp_filter(sinograms[:, row, :], ramp, "hann", pad, "edge")
    filter_seconds = time.perf_counter() - began

    began = time.perf_counter()
    filtered_back_projection(sinograms[:, :1], angles, center, "hann", True)
    one_core = time.perf_counter() - began  # a single slice, one thread, warm
    on_cpu, cpu_seconds = cpu_pool(sinograms, angles, center, args.workers)

    rows = args.rows
    spread = float(on_cpu.max() - on_cpu.min())
    difference = float(np.abs(on_gpu - on_cpu).max())
    print(f"GPU FBP: {rows / gpu_seconds:.2f} slices/s ({gpu_seconds:.2f} s for {rows})")
    print(f"  of which the ramp filter on the CPU: {filter_seconds:.2f} s")
    print(f"CPU FBP, {args.workers} one-thread processes: {rows / cpu_seconds:.2f} slices/s")
    print(f"CPU FBP, one core: {1 / one_core:.3f} slices/s")
    print(f"ratio GPU / CPU pool: {cpu_seconds / gpu_seconds:.1f}x faster")
    print(f"ratio GPU / one core: {one_core * rows / gpu_seconds:.1f}x faster")
    print(f"largest |GPU - CPU| / range: {difference / spread:.2e}")
    return 0 if difference <= 1e-3 * spread else 1


if __name__ == "__main__":
    sys.exit(main())
