"""Benchmark: `calypso run diffraction` end to end versus a bare pyFAI loop, same run.

    python tests/benchmarks/bench_diffraction.py [--frames 500] [--workers N]

1. Writes a sample Bliss dataset of Pilatus 1M frames (bitshuffle-LZ4 Lima files).
2. Starts a real Prefect server (`calypso server`), as at a facility, and times the
   `calypso run diffraction` command as a subprocess: start-up, Dask cluster,
   reading, integration, NeXus writing and catalogue included. Peak memory is the
   largest summed RSS of the command and its worker processes.
3. Times a bare pyFAI loop over the same frames already in memory, one process per
   core, each integrating its share with one integrator (built inside the timing).
4. Optionally (--ephemeral) times the same command with no server configured
   (Prefect's temporary server is started by the command itself).

The machine is shared and noisy: compare the ratio printed, not absolute times.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import isolated_environment, prefect_server, scratch_folder
from harness import time_command as run_command


def parameters(sample) -> list[str]:
    return [
        "--set", f"poni={sample.calibration['poni']}",
        "--set", f"mask={sample.calibration['mask']}",
        "--set", "monitor=mon", "--set", "monitor_reference=1e5",
    ]  # fmt: skip


def time_command(raw_dir: Path, sample, workers: int, env: dict[str, str], output: Path):
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "diffraction", str(raw_dir),
        *parameters(sample), "--workers", str(workers), "--output", str(output), "--json",
    ]  # fmt: skip
    return run_command(command, env)


def _bare_worker(args) -> tuple[float, int]:
    poni, mask_file, frames_slice, raw_file, barrier, npt, monitor = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import fabio
    import h5py
    import hdf5plugin  # noqa: F401
    import pyFAI

    with h5py.File(raw_file, "r", locking=False) as h5:
        frames = h5["1.1/measurement/pilatus1m"][frames_slice]
        counts = h5["1.1/measurement/mon"][frames_slice]
    mask = fabio.open(mask_file).data
    barrier.wait()
    began = time.perf_counter()
    integrator = pyFAI.load(poni)
    for frame, count in zip(frames, counts, strict=True):
        integrator.integrate1d(
            frame, npt, unit="q_nm^-1", mask=mask, error_model="poisson",
            method=("bbox", "csr", "cython"),
            normalization_factor=count / 1e5 if monitor else 1.0,
        )  # fmt: skip
    return time.perf_counter() - began, len(frames)


def time_bare_loop(
    sample, n_frames: int, processes: int, npt: int = 1000, monitor: bool = True
) -> float:
    """Frames/s of plain pyFAI over frames in memory, one process per core, with the
    options the runs it is compared with use: ``npt`` bins in q (nm^-1), Poisson errors,
    ``bbox,csr,cython``, normalised by the ``mon`` counter (``monitor``) or not."""
    bounds = [round(i * n_frames / processes) for i in range(processes + 1)]
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(processes)
        jobs = [
            (str(sample.calibration["poni"]), str(sample.calibration["mask"]),
             slice(bounds[i], bounds[i + 1]), str(sample.dataset.raw_file), barrier, npt,
             monitor)
            for i in range(processes)
        ]  # fmt: skip
        with context.Pool(processes) as pool:
            results = pool.map(_bare_worker, jobs)
    return n_frames / max(seconds for seconds, _ in results)


def _each(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data", type=Path, help="reuse sample data written here before")
    parser.add_argument("--ephemeral", action="store_true", help="also time ephemeral mode")
    parser.add_argument("--half", action="store_true", help="also run half the frames (memory)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats")
    parser.add_argument(
        "--scaling", action="store_true", help="also run with 1 worker: speed-up from 1 to N"
    )
    args = parser.parse_args()

    from calypso.flows.samples.diffraction import write_diffraction_sample

    work = scratch_folder("calypso-bench-")
    data_root = args.data or work / "visitor"
    began = time.perf_counter()
    sample = write_diffraction_sample(
        data_root, frames=args.frames, frames_per_file=100, reuse=bool(args.data)
    )
    print(f"sample data: {args.frames} Pilatus 1M frames in {time.perf_counter() - began:.0f} s")

    env = isolated_environment(work)
    with prefect_server(env) as served:
        command_fps, flow_fps, step_fps, bare_fps, busy, peak = [], [], [], [], [], 0
        for repeat in range(args.repeat):  # interleaved, so both sides share the noise
            wall, summary, peak_run = time_command(
                sample.raw_dataset_dir, sample, args.workers, served, work / f"out{repeat}"
            )
            peak = max(peak, peak_run)
            command_fps.append(args.frames / wall)
            flow_fps.append(summary["frames_per_s"])
            timings = summary["timings_s"]
            step_fps.append(args.frames / timings["integrate"])
            busy.append(timings["busy_in_tasks"] / (timings["total"] * args.workers))
            bare_fps.append(time_bare_loop(sample, args.frames, args.workers))
        command, flow, bare = median(command_fps), median(flow_fps), median(bare_fps)
        step = median(step_fps)
        print(f"{args.frames} frames, {args.workers} workers, chunk size "
              f"{summary['chunk_size']} ({summary['chunks']} chunks), "
              f"{args.repeat} interleaved repeats, medians:")  # fmt: skip
        print(f"calypso run (command, server running): {command:7.1f} frames/s  "
              f"{_each(command_fps)}")  # fmt: skip
        print(f"  inside the flow run:                 {flow:7.1f} frames/s  {_each(flow_fps)}")
        print(f"  its integration step alone:          {step:7.1f} frames/s  {_each(step_fps)}")
        print(f"  share of flow time spent in chunk tasks: {median(busy):.2f}")
        print(f"bare pyFAI loop, frames in memory:     {bare:7.1f} frames/s  {_each(bare_fps)}")
        print(f"ratio command / bare:  {command / bare:.2f}")
        print(f"ratio flow run / bare: {flow / bare:.2f}")
        print(f"ratio integration step / bare (frames/s inside a run): {step / bare:.2f}")
        print(f"peak RSS of the command and its workers: {peak / 2**30:.2f} GiB")
        if args.half:
            half = write_diffraction_sample(
                work / "half", frames=args.frames // 2, frames_per_file=100
            )
            _, _, half_peak = time_command(
                half.raw_dataset_dir, half, args.workers, served, work / "half-out"
            )
            print(f"peak RSS with {args.frames // 2} frames: {half_peak / 2**30:.2f} GiB")
        if args.scaling:
            _, one, _ = time_command(
                sample.raw_dataset_dir, sample, 1, served, work / "out-one-worker"
            )
            per_frame = 1000 * one["timings_s"]["busy_in_tasks"] / args.frames
            chunk = one["chunk_size"]
            bare_one = time_bare_loop(sample, args.frames, 1)
            print(f"1 worker, inside the flow run: {one['frames_per_s']:.1f} frames/s; "
                  f"speed-up with {args.workers} workers: {flow / one['frames_per_s']:.2f}; "
                  f"cost in chunk tasks {per_frame:.0f} ms a frame "
                  f"({per_frame * chunk / 1000:.1f} s a {chunk}-frame chunk)")  # fmt: skip
            print(f"bare loop, 1 process: {bare_one:.1f} frames/s; speed-up with "
                  f"{args.workers} processes: {bare / bare_one:.2f}")  # fmt: skip
            one_step = args.frames / one["timings_s"]["integrate"]
            gained, kernel = flow / one["frames_per_s"], bare / bare_one
            print(f"speed-up 1 -> {args.workers} workers of the kernel's: whole flow "
                  f"{gained / kernel:.2f}, integration step {step / one_step / kernel:.2f} "
                  f"(its own speed-up {step / one_step:.2f})")  # fmt: skip
        if args.ephemeral:
            wall, _, _ = time_command(
                sample.raw_dataset_dir, sample, args.workers, env, work / "out-ephemeral"
            )
            print(f"calypso run (ephemeral Prefect server): {args.frames / wall:7.1f} frames/s "
                  f"({wall:.1f} s); ratio / bare {args.frames / wall / bare:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
