"""Benchmark: `calypso run spectroscopy` on a map of spectra versus a plain vectorised loop.

    python tests/benchmarks/bench_spectroscopy.py [--spectra 10000] [--workers N]

1. Writes a Bliss mapping scan of N Fe K-edge spectra (2D counters, built from
   the real Fe spectrum of the shared data).
2. Starts a real Prefect server (`calypso server`) and times the
   `calypso run spectroscopy` command as a subprocess; the flow's own timing
   (inside the flow run) comes from its JSON summary. Peak memory is the largest
   summed RSS of the command and its workers.
3. Times the same reduction (mu, calibration, normalisation, EXAFS, FT) as a plain
   vectorised loop in one process over the same counters read with h5py.
4. Prints spectra/s of each and the ratio per core used: flow / (loop x workers).

The machine is shared and noisy: compare the ratios printed, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import isolated_environment, prefect_server
from harness import time_command as run_command


def time_command(raw_dir: Path, workers: int, env: dict[str, str], output: Path):
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "spectroscopy", str(raw_dir),
        "--workers", str(workers), "--output", str(output), "--json",
    ]  # fmt: skip
    return run_command(command, env)


def time_plain_loop(raw_dir: Path, batch_size: int) -> float:
    """Spectra/s of the same reduction, vectorised, in this one process (reading included)."""
    from calypso.tasks.plans.spectroscopy import make_spectroscopy_plan, reduction_keywords
    from calypso.tasks.raw.absorption import absorption
    from calypso.tasks.raw.spectra import read_bliss_counters
    from calypso.techniques.spectroscopy import SpectroscopyParameters, reduce_spectra

    parameters = SpectroscopyParameters()
    plan = make_spectroscopy_plan(
        str(raw_dir), parameters, output_dir=str(harness.scratch_folder())
    )
    reference = plan.calibration.reference_e0 if plan.calibration else None
    source = plan.sources[0]
    began = time.perf_counter()
    for start in range(0, source.n_spectra, batch_size):
        table = read_bliss_counters(source.path, 1, start, start + batch_size)
        data = absorption(table, parameters)
        reduce_spectra(
            data.energy,
            data.mu,
            mu_reference=data.mu_reference,
            reference_e0=reference,
            **reduction_keywords(parameters),
        )
    return source.n_spectra / (time.perf_counter() - began)


def _each() -> str:
    """The last command's peak RSS, process by process (the command first)."""
    return ", ".join(f"{rss / 2**30:.2f}" for rss in harness.LAST_PEAKS) + " GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats")
    parser.add_argument("--half", action="store_true", help="also run half the spectra (memory)")
    parser.add_argument(
        "--also", type=int, metavar="N", help="also run N spectra first (peak memory from N up)"
    )
    args = parser.parse_args()

    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample

    work = harness.scratch_folder("calypso-bench-")
    smaller = args.also or (args.spectra // 2 if args.half else None)
    counts = [smaller, args.spectra] if smaller else [args.spectra]
    datasets = {}
    for count in counts:
        began = time.perf_counter()
        datasets[count] = write_spectroscopy_map_sample(work / f"visitor{count}", count)
        print(f"sample data: {count} spectra in {time.perf_counter() - began:.1f} s")
    env = isolated_environment(work)
    with prefect_server(env) as served:
        if smaller:
            _, _, peak = time_command(
                datasets[counts[0]].raw_dataset_dir, args.workers, served, work / "half"
            )
            print(f"peak RSS (command + workers), {counts[0]} spectra: {peak / 2**30:.2f} GiB")
            print(f"  each process: {_each()}")
        raw_dir = datasets[args.spectra].raw_dataset_dir
        command_rate, flow_rate, loop_rate, busy, peak = [], [], [], [], 0
        for repeat in range(args.repeat):  # interleaved, so both sides share the noise
            wall, summary, peak_run = time_command(
                raw_dir, args.workers, served, work / f"{repeat}"
            )
            peak = max(peak, peak_run)
            print(f"peak RSS, {args.spectra} spectra, repeat {repeat}: {peak_run / 2**30:.2f} GiB")
            print(f"  each process: {_each()}")
            command_rate.append(args.spectra / wall)
            flow_rate.append(summary["per_s"])
            timings = summary["timings_s"]
            busy.append(timings["busy_in_tasks"] / (timings["total"] * args.workers))
            batch = -(-args.spectra // summary["tasks"])
            loop_rate.append(time_plain_loop(raw_dir, batch))
    command, flow, loop = median(command_rate), median(flow_rate), median(loop_rate)
    print(
        f"{args.spectra} spectra, {args.workers} workers, {summary['tasks']} batches, "
        f"{args.repeat} interleaved repeats, medians:"
    )
    print(f"calypso run (whole command):   {command:8.0f} spectra/s")
    print(f"inside the flow run:           {flow:8.0f} spectra/s")
    print(f"plain vectorised loop, 1 proc: {loop:8.0f} spectra/s")
    print(f"ratio per core, flow / (loop x {args.workers}):    {flow / loop / args.workers:.2f}")
    print(f"ratio per core, command / (loop x {args.workers}): {command / loop / args.workers:.2f}")
    print(f"batch tasks busy: {median(busy):.2f} of the flow's worker time")
    print(f"peak RSS (command + workers), {args.spectra} spectra: {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
