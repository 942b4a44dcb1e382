"""Calypso against ewoksxrpd on the same scan, side by side in one run (issue #18's targets).

The same data for both: a simulated CeO2 scan of Pilatus 1M frames in the Bliss layout
(bitshuffle-LZ4 Lima files, as ``calypso sample-data diffraction`` writes), its PONI and
mask, ``--npt`` bins in q (nm^-1), ``bbox,csr,cython``, Poisson errors. Alternated
``--repeat`` times:

* **ewoksxrpd** ``IntegrateBlissScan`` (read + integrate + save, one process, pyFAI's
  OpenMP threads), the way blissoda runs it, in its own virtual environment
  (``.venv-peer``, made on first use: ewoksxrpd pulls in Qt and OpenCL packages that
  Calypso's environment should not carry);
* ``calypso run diffraction`` cold (Prefect's temporary server and a Dask cluster of its
  own, nothing kept, in a new home: a user's very first run with ``local_keep_s = 0``);
* ``calypso run diffraction`` as the first command of a new home with no configuration
  (it starts the local Prefect server it leaves for the next commands);
* ``calypso run diffraction`` with no configuration after the first command (the local
  Prefect server that command left, as on a user's machine);
* ``calypso run diffraction`` against a running ``calypso server`` (a cluster per command);
* ``calypso run diffraction`` submitted to a running ``calypso serve`` (the warm service:
  its Dask workers, caches and Prefect client already up), on this scan and on a 5-frame
  scan, whose time less 5 frames' worth is the fixed cost of a run;
* the bare pyFAI loop, frames in memory, one process per core (the kernel's own speed).

Prints each wall time and the ratios to ewoksxrpd and to the bare loop. Never asserts.

    python tests/benchmarks/bench_vs_ewoksxrpd.py --frames 600 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_diffraction import time_bare_loop
from harness import (
    REPO,
    isolated_environment,
    kept_local_server,
    prefect_server,
    scratch_folder,
    warm_service,
)
from harness import time_command as run_command

PEER = REPO / ".venv-peer"
SMALL = 5  # frames of the scan that measures a run's fixed cost
LABELS = [
    ("ewoksxrpd", "ewoksxrpd"),
    ("cold", "calypso run --local, cold (temporary server)"),
    ("first", "calypso run --local, a new home's first"),
    ("kept", "calypso run --local, local server kept"),
    ("server", "calypso run --local, server up"),
    ("service", "calypso run, sent to calypso serve"),
    ("small", f"{SMALL} frames, sent to calypso serve"),
]

# ewoksxrpd run as blissoda's online processing runs it, on one scan.
_PEER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import hdf5plugin  # noqa: F401  (bitshuffle-LZ4 Lima files)
    import pyFAI
    from ewoksxrpd.tasks.integrate import IntegrateBlissScan

    raw, output, poni, mask, npt = sys.argv[1:6]
    ai = pyFAI.load(poni)
    geometry = {k: getattr(ai, k) for k in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3")}
    began = time.perf_counter()
    task = IntegrateBlissScan(inputs={
        "filename": raw, "scan": 1, "detector_name": "pilatus1m",
        "output_filename": output, "geometry": geometry,
        "energy": pyFAI.units.hc / (ai.wavelength * 1e10),
        "detector": ai.detector.get_name(), "detector_config": ai.detector.get_config(),
        "mask": mask,
        "integration_options": {"nbpt_rad": int(npt), "unit": "q_nm^-1",
                                "method": "bbox_csr_cython", "error_model": "poisson"},
        "retry_timeout": 10,
    })
    task.execute()
    print(json.dumps({"seconds": time.perf_counter() - began}))
    """
)


def peer_python() -> Path:
    """ewoksxrpd's interpreter, installed into .venv-peer on first use."""
    python = PEER / "bin" / "python"
    if not python.exists():
        print("installing ewoksxrpd into .venv-peer (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "ewoksxrpd", "hdf5plugin"],
            check=True,
        )
    return python


def time_peer(python: Path, sample, output: Path, npt: int) -> float:
    """Whole-process wall time of ewoksxrpd on the scan (its start-up included)."""
    script = output.parent / "ewoksxrpd_run.py"
    script.write_text(_PEER_SCRIPT)
    output.unlink(missing_ok=True)
    began = time.perf_counter()
    subprocess.run(
        [str(python), str(script), str(sample.dataset.raw_file), str(output),
         str(sample.calibration["poni"]), str(sample.calibration["mask"]), str(npt)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - began


def time_calypso(sample, npt: int, env: dict[str, str], output: Path, served=False) -> float:
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "diffraction",
        str(sample.raw_dataset_dir), "--set", f"poni={sample.calibration['poni']}",
        "--set", f"mask={sample.calibration['mask']}", "--set", f"npt={npt}",
        "--set", "unit=q_nm^-1", "--output", str(output), "--json",
    ]  # fmt: skip
    wall, summary, _ = run_command(command if served else [*command, "--local"], env)
    if served != ("service" in summary):
        raise SystemExit(f"expected the run {'in' if served else 'outside'} the service")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--npt", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="alternated repeats")
    parser.add_argument("--data", type=Path, help="reuse sample data written here before")
    args = parser.parse_args()

    from calypso.flows.samples.diffraction import write_diffraction_sample

    python = peer_python()
    work = scratch_folder("calypso-vs-ewoksxrpd-")
    root = args.data or work / "visitor"
    sample = write_diffraction_sample(root, frames=args.frames, seed=1, reuse=bool(args.data))
    small = write_diffraction_sample(
        root, frames=SMALL, seed=2, dataset_number=2, reuse=bool(args.data)
    )
    processed = sample.dataset.session_dir / "PROCESSED_DATA"  # beside RAW_DATA
    # A home for each: a user's kept local server, a `calypso server` with `calypso serve`,
    # and a new one for each cold run (a user's very first command).
    times: dict[str, list[float]] = {name: [] for name, _ in LABELS}
    with (
        kept_local_server(isolated_environment(work / "kept")) as kept_env,
        prefect_server(isolated_environment(work / "served")) as served_env,
        warm_service(served_env, root, work, "diffraction") as warm_env,
    ):
        # The first command starts the kept server and cluster (that is the cold run).
        time_calypso(small, args.npt, kept_env, work / "kept_first")
        # A service that has reduced a scan of this calibration before, as at a beamline:
        # every worker's integrator and its quick look's radial map made (its first run
        # after a start paid them: 14.7 s against 9.8-12.3 s for 600 frames, session 31).
        # The scan itself, not a few frames: those are one chunk, on one worker, and the
        # other then made its integrator in the first timed run (11.5 s against 8.9-9.9 s
        # for the next two, session 32).
        time_calypso(sample, args.npt, warm_env, processed / "warm_first", True)
        for index in range(args.repeat):
            times["ewoksxrpd"].append(
                time_peer(python, sample, work / f"ewoksxrpd_{index}.h5", args.npt)
            )
            env = isolated_environment(work / f"new-home-{index}")
            times["cold"].append(time_calypso(sample, args.npt, env, work / f"cold_{index}"))
            with kept_local_server(isolated_environment(work / f"first-home-{index}")) as env:
                times["first"].append(time_calypso(sample, args.npt, env, work / f"first_{index}"))
            times["kept"].append(time_calypso(sample, args.npt, kept_env, work / f"kept_{index}"))
            times["server"].append(
                time_calypso(sample, args.npt, served_env, work / f"server_{index}")
            )
            times["service"].append(
                time_calypso(sample, args.npt, warm_env, processed / f"warm_{index}", True)
            )
            times["small"].append(
                time_calypso(small, args.npt, warm_env, processed / f"small_{index}", True)
            )
            print(
                f"run {index}: "
                + ", ".join(f"{name} {times[name][-1]:.1f} s" for name, _ in LABELS),
                flush=True,
            )
    # The runs' own options: --npt bins, no monitor (the bare loop's default is 1000 bins).
    bare = time_bare_loop(sample, args.frames, os.cpu_count() or 2, args.npt, monitor=False)
    peer = median(times["ewoksxrpd"])
    print(f"\n{args.frames} frames, {args.npt} bins, {os.cpu_count()} cores (medians)")
    print(f"bare pyFAI loop, frames in memory: {bare:.1f} frames/s")
    for name, label in LABELS[:-1]:
        wall = median(times[name])
        print(
            f"{label:>34}: {wall:6.1f} s wall, {args.frames / wall:5.1f} frames/s, "
            f"{wall / peer:.2f}x ewoksxrpd's time, {args.frames / wall / bare:.2f} of bare"
        )
    # Each row against ewoksxrpd's time in the same repeat: a repeat shares the machine's
    # moment (its load moves both), which the ratio of medians does not.
    print("repeat by repeat, x the same repeat's ewoksxrpd time:")
    for name, label in LABELS[1:-1]:
        ratios = [ours / peer for ours, peer in zip(times[name], times["ewoksxrpd"], strict=True)]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{label:>34}: {listed} (median {median(ratios):.2f})")
    per_frame = median(times["service"]) / args.frames
    fixed = median(times["small"]) - SMALL * per_frame
    print(
        f"{LABELS[-1][1]:>34}: {median(times['small']):6.2f} s wall, fixed cost of a run "
        f"{fixed:.2f} s (less {SMALL} frames at the {args.frames}-frame run's pace)"
    )


if __name__ == "__main__":
    main()
