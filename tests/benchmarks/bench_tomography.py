"""Benchmark: `calypso run tomography` end to end versus algotom's FBP alone on sinograms in memory.

    python tests/benchmarks/bench_tomography.py [--rows 64] [--columns 1024]
        [--projections 900] [--workers 2] [--set ring_removal=false ...]

1. Writes a Bliss phantom scan (Lima files, bitshuffle-LZ4, one chunk a frame, as
   Lima writes them) with ROWS detector rows, and a second one with 2 x ROWS.
2. Starts a real Prefect server (`calypso server`) and times
   `calypso run tomography` on each as a subprocess: the flow's own time (from
   its JSON summary: centre of rotation, reading, flat field, ring removal,
   FBP, writing, Prefect and Dask) and the command's wall time; peak memory is
   the largest summed RSS of the command and its workers.
3. Reads and prepares the same sinograms into memory, then times the backend
   alone on them: algotom's FBP (same filter, same centre, same slices) in a
   pool of WORKERS processes, one numba thread each, as the flow runs it.
4. Prints slices/s of each, the ratio flow / backend, and the peak memory of
   both sizes (flat memory: it should not double when the slices do).

The machine is shared and noisy: compare the ratios printed, not absolute times.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import isolated_environment, prefect_server, scratch_folder
from harness import time_command as run_command

_SINOGRAMS = None  # (sinograms, angles) in each pool process, loaded by _load


def time_flow(raw_dir: Path, workers: int, env: dict[str, str], output: Path, settings: list[str]):
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "tomography", str(raw_dir),
        "--workers", str(workers), "--output", str(output), "--json",
        *[arg for setting in settings for arg in ("--set", setting)],
    ]  # fmt: skip
    return run_command(command, env)


def _load(sinograms: str, angles: str) -> None:
    global _SINOGRAMS
    _SINOGRAMS = (np.load(sinograms), np.load(angles))


def _reconstruct_rows(job: tuple[int, int, float]) -> float:
    from calypso.techniques.tomography import reconstruct

    first, stop, center = job
    sinograms, angles = _SINOGRAMS
    return float(reconstruct(sinograms[:, first:stop], angles, center).sum())


def time_backend(raw_dir: Path, center: float, workers: int) -> float:
    """Slices/s of algotom's FBP alone on sinograms already in memory, ``workers`` processes.

    The pool's processes are spawned, not forked (numba's threading layer is
    running here), and load the prepared sinograms before the clock starts.
    """
    from calypso.tasks.plans.tomography import make_tomography_plan
    from calypso.tasks.tomography import prepared_sinograms
    from calypso.techniques.tomography import TomographyParameters

    work = scratch_folder()
    plan = make_tomography_plan(str(raw_dir), TomographyParameters(), output_dir=str(work))
    np.save(work / "sinograms.npy", prepared_sinograms(plan, 0, plan.scan.rows))
    np.save(work / "angles.npy", plan.scan.angles_rad)
    jobs = [(first, stop, center) for first, stop in plan.slabs()]
    context = multiprocessing.get_context("spawn")
    arguments = (str(work / "sinograms.npy"), str(work / "angles.npy"))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_load,
                             initargs=arguments) as pool:  # fmt: skip
        list(pool.map(_reconstruct_rows, jobs[:workers]))  # load and compile in every process
        began = time.perf_counter()
        list(pool.map(_reconstruct_rows, jobs))
        seconds = time.perf_counter() - began
    return plan.scan.rows / seconds


def main() -> None:
    # The backend runs as in Calypso's Dask workers: algotom's kernel, one numba
    # thread a process (set before numba is imported, as the workers have it).
    os.environ["NUMBA_NUM_THREADS"] = "1"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--columns", type=int, default=1024)
    parser.add_argument("--projections", type=int, default=900)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--set", action="append", default=[], help="flow parameter NAME=VALUE (repeatable)"
    )
    args = parser.parse_args()

    from calypso.flows.samples.tomography import write_tomography_sample

    work = scratch_folder("calypso-bench-tomo-")
    env = isolated_environment(work)
    samples = {}
    for rows in (args.rows, 2 * args.rows):
        began = time.perf_counter()
        samples[rows] = write_tomography_sample(
            work / f"visitor{rows}", rows=rows, columns=args.columns, projections=args.projections
        )
        print(
            f"wrote {rows} rows x {args.columns} columns x {args.projections} projections "
            f"in {time.perf_counter() - began:.0f} s",
            flush=True,
        )
    results = {}
    with prefect_server(env) as server_env:
        for rows, sample in samples.items():
            wall, summary, peak = time_flow(
                sample.raw_dataset_dir, args.workers, server_env, work / f"out{rows}", args.set
            )
            results[rows] = (wall, summary, peak)
            print(
                f"{rows} slices: flow {summary['timings_s']['total']:.1f} s "
                f"(centre {summary['timings_s']['center_of_rotation']:.1f} s, "
                f"{summary['tasks']} slab tasks of {summary['chunk_rows']} rows, busy "
                f"{summary['timings_s']['busy_in_tasks']:.1f} s), command {wall:.1f} s, "
                f"peak RSS {peak / 2**30:.2f} GiB",
                flush=True,
            )
    rows = args.rows
    wall, summary, peak = results[rows]
    backend = time_backend(
        samples[rows].raw_dataset_dir, summary["center_of_rotation"], args.workers
    )
    flow_rate = rows / summary["timings_s"]["total"]
    command_rate = rows / wall
    print()
    print(
        f"slices of {args.columns}^2 from {args.projections} projections, {args.workers} "
        f"workers, flow parameters: {' '.join(args.set) or 'defaults'}"
    )
    print(f"  backend alone (algotom FBP, sinograms in memory): {backend:8.2f} slices/s")
    print(f"  flow (raw files -> NeXus, inside the flow run)  : {flow_rate:8.2f} slices/s")
    print(f"  command (incl. Prefect/Dask start-up)           : {command_rate:8.2f} slices/s")
    print(f"  ratio flow / backend    : {flow_rate / backend:.2f}  (target >= 0.8)")
    print(f"  ratio command / backend : {command_rate / backend:.2f}")
    small, large = results[args.rows][2], results[2 * args.rows][2]
    print(
        f"  peak RSS {args.rows} slices {small / 2**30:.2f} GiB, {2 * args.rows} slices "
        f"{large / 2**30:.2f} GiB (x{large / small:.2f} for x2 slices)"
    )


if __name__ == "__main__":
    main()
