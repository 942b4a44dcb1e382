"""Benchmark: `calypso run mx` end to end versus the spot finder alone on frames in memory.

    python tests/benchmarks/bench_mx.py [--frames 200] [--workers 2]

1. Writes a Bliss grid scan of FRAMES Eiger 4M frames (2167 x 2070 pixels,
   4 x 2 modules with their gaps, uint32, bitshuffle-LZ4, one HDF5 chunk a frame).
2. Starts a real Prefect server (`calypso server`) and times `calypso run mx` as a
   subprocess: the flow's own time (from its JSON summary: reading, spot finding,
   writing the NeXus report, Prefect and Dask) and the command's wall time; peak
   memory is the largest summed RSS of the command and its workers.
3. Reads the same frames into memory, then times the spot finder alone on them
   (`find_spots` and the per-image summary, same parameters, same mask) in a pool
   of WORKERS processes: all the cores, as the flow uses them.
4. Prints images/s of each and the ratio flow / spot finder alone.

The machine is shared and noisy: compare the ratios printed, not absolute times.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import isolated_environment, prefect_server, scratch_folder
from harness import time_command as run_command

_FRAMES = None  # (frames, scan, parameters), inherited by the forked pool workers


def _find(indices: list[int]) -> int:
    from calypso.tasks.mx import detector_statics, spot_finding_keywords
    from calypso.techniques import mx

    frames, scan, parameters = _FRAMES
    statics = detector_statics(scan, parameters)
    total = 0
    for index in indices:
        image = frames[index]
        valid = statics.valid & (image < scan.saturation)
        spots = mx.find_spots(image, valid, **spot_finding_keywords(parameters))
        mx.summarize_image(
            spots, scan.geometry, statics.d_range, ice_ring_ratio=parameters.ice_ring_ratio
        )
        total += len(spots)
    return total


def time_spot_finder(raw_dir: Path, mask: Path, workers: int, chunk: int) -> float:
    """Images/s of the spot finder alone on frames already in memory, ``workers`` processes."""
    global _FRAMES
    from calypso.tasks.plans.mx import make_mx_plan
    from calypso.tasks.raw.frames import read_frames
    from calypso.techniques.mx import MXParameters

    parameters = MXParameters(mask=str(mask))
    plan = make_mx_plan(str(raw_dir), parameters, output_dir=str(scratch_folder()))
    scan = plan.scans[0]
    frames = read_frames(scan.sources[0], 0, scan.n_frames)
    _FRAMES = (frames, scan, parameters)
    jobs = [
        list(range(start, min(start + chunk, len(frames))))
        for start in range(0, len(frames), chunk)
    ]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_find, [[0]] * workers))  # each process builds its resolution map once
        began = time.perf_counter()
        list(pool.map(_find, jobs))
        seconds = time.perf_counter() - began
    return len(frames) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from calypso.flows.samples.mx import write_mx_sample

    columns = 20
    rows = -(-args.frames // columns)
    work = scratch_folder("calypso-bench-mx-")
    env = isolated_environment(work)
    began = time.perf_counter()
    sample = write_mx_sample(
        work / "visitor",
        grid=(rows, columns),
        modules=(4, 2),
        module=(514, 1030),
        crystal_at=(rows / 2 - 0.4, columns / 2 + 0.3),
        crystal_size=max(rows, columns) / 4,
        ice_frames=(3, 17),
    )
    n_frames = rows * columns
    print(f"wrote {n_frames} Eiger 4M frames in {time.perf_counter() - began:.0f} s", flush=True)
    with prefect_server(env) as server_env:
        command = [
            sys.executable, "-m", "calypso.flows.cli", "run", "mx", str(sample.raw_dataset_dir),
            "--workers", str(args.workers), "--output", str(work / "out"), "--json",
            "--set", f"mask={sample.mask}",
        ]  # fmt: skip
        wall, summary, peak = run_command(command, server_env)
    timings = summary["timings_s"]
    print(
        f"flow {timings['total']:.1f} s ({summary['tasks']} tasks of {summary['chunk_size']} "
        f"frames, busy {timings['busy_in_tasks']:.1f} s), command {wall:.1f} s, "
        f"peak RSS {peak / 2**30:.2f} GiB",
        flush=True,
    )
    alone = time_spot_finder(
        sample.raw_dataset_dir, sample.mask, args.workers, summary["chunk_size"]
    )
    flow_rate = n_frames / timings["total"]
    command_rate = n_frames / wall
    median_spots = np.median([s["spots_per_image_median"] for s in summary["report"]["scans"]])
    print()
    print(f"{n_frames} Eiger 4M frames (median {median_spots:.0f} spots), {args.workers} workers")
    print(f"  spot finder alone, frames in memory : {alone:8.2f} images/s")
    print(f"  flow (Bliss/Lima files -> NeXus)    : {flow_rate:8.2f} images/s")
    print(f"  command (incl. Prefect/Dask start)  : {command_rate:8.2f} images/s")
    print(f"  ratio flow / spot finder alone      : {flow_rate / alone:.2f}  (target >= 0.8)")
    print(f"  ratio command / spot finder alone   : {command_rate / alone:.2f}")


if __name__ == "__main__":
    main()
