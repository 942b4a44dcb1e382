"""XAS side by side in one run: one spectrum and a map, alone and sent to ``calypso serve``.

Issue #18's XAS targets, each against what a user would otherwise do:

* **one spectrum** (a real XDI file of the shared data, ``--file``): ``calypso run
  spectroscopy FILE`` cold (``--local``, Prefect's temporary server), with the local
  Prefect server that a first command started and kept, and sent to a running
  ``calypso serve``; against **larch** in a loop that has already imported it
  (``read_ascii`` + ``pre_edge`` + ``autobk``, the alternative a user would pick);
* **a map** of ``--spectra`` spectra (a Bliss mapping scan built from the real Fe
  spectrum), sent to ``calypso serve``, whole command; against the plain vectorised loop
  of the same reduction in one process, per core. The service's first map (its workers'
  first touches of memory) is timed and printed apart, before the repeats.

Prints wall times and ratios; never asserts.

    python tests/benchmarks/bench_xas_warm.py --spectra 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_spectroscopy import time_plain_loop
from harness import (
    REPO,
    isolated_environment,
    kept_local_server,
    prefect_server,
    scratch_folder,
    warm_service,
)
from harness import time_command as run_command


def time_run(raw: Path, env: dict[str, str], output: Path, served: bool) -> tuple[float, dict]:
    command = [
        sys.executable, "-m", "calypso.flows.cli", "run", "spectroscopy", str(raw),
        "--output", str(output), "--json",
    ]  # fmt: skip
    wall, summary, _ = run_command(command if served else [*command, "--local"], env)
    if served != ("service" in summary):
        raise SystemExit(f"expected the run {'in' if served else 'outside'} the service")
    return wall, summary


def time_larch(path: Path, repeat: int) -> float:
    """Seconds per spectrum of larch's own reduction, imports already paid."""
    from larch.io import read_ascii
    from larch.xafs import autobk, pre_edge

    began = time.perf_counter()
    for _ in range(repeat):
        group = read_ascii(str(path))
        energy = group.energy
        mu = next(
            (getattr(group, n) for n in ("mu", "mutrans", "mufluor") if hasattr(group, n)), None
        )
        if mu is None:  # transmission from the detector columns, as Athena would
            mu = np.log(group.i0 / group.itrans)
        pre_edge(energy, mu, group=group)
        autobk(energy, mu, group=group, rbkg=1.0)
    return (time.perf_counter() - began) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("CALYPSO_TEST_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--file", type=Path, default=data / "xas" / "fe_metal_rt.xdi")
    parser.add_argument("--spectra", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternated repeats")
    args = parser.parse_args()

    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample

    work = scratch_folder("calypso-xas-warm-")
    root = work / "visitor"
    spectrum = root / "standards" / args.file.name  # a copy: runs read inside the roots
    spectrum.parent.mkdir(parents=True)
    shutil.copyfile(args.file, spectrum)
    sample = write_spectroscopy_map_sample(root, args.spectra)
    processed = sample.session_dir / "PROCESSED_DATA"  # beside RAW_DATA
    one = {"cold": [], "kept": [], "served": []}
    maps, loops = [], []
    # A home for each (servers sharing one SQLite database lock each other out): a
    # `calypso server` with `calypso serve`, a user's kept local server, and a new one
    # for each cold run (a user's very first command).
    with (
        prefect_server(isolated_environment(work / "served")) as served_env,
        warm_service(served_env, root, work, "spectroscopy") as warm_env,
        kept_local_server(isolated_environment(work / "kept")) as kept_env,
    ):
        time_run(spectrum, kept_env, work / "first", False)  # starts the kept local server
        # The service's first map pays its workers' first touches of memory (seconds on a
        # virtual machine that hands each new page over from its host): shown apart.
        first_map, _ = time_run(sample.raw_dataset_dir, warm_env, processed / "first", True)
        for index in range(args.repeat):
            env = isolated_environment(work / f"new-home-{index}")
            one["cold"].append(time_run(spectrum, env, work / f"cold_{index}", False)[0])
            one["kept"].append(time_run(spectrum, kept_env, work / f"kept_{index}", False)[0])
            wall, _ = time_run(spectrum, warm_env, root / "standards" / f"warm_{index}", True)
            one["served"].append(wall)
            wall, summary = time_run(
                sample.raw_dataset_dir, warm_env, processed / f"m{index}", True
            )
            maps.append(args.spectra / wall)
            batch = -(-args.spectra // summary["tasks"])
            loops.append(time_plain_loop(sample.raw_dataset_dir, batch))
            print(
                f"run {index}: one spectrum cold {one['cold'][-1]:.2f} s, local server kept "
                f"{one['kept'][-1]:.2f} s, sent to serve "
                f"{one['served'][-1]:.2f} s; map sent to serve {maps[-1]:.0f} spectra/s, "
                f"loop {loops[-1]:.0f} spectra/s",
                flush=True,
            )
    larch = time_larch(spectrum, 20)
    cores = os.cpu_count() or 2
    print(f"\nXAS, {cores} cores, medians of {args.repeat}")
    print(f"larch read_ascii + pre_edge + autobk, warm loop: {larch:6.3f} s a spectrum")
    labels = (
        ("cold", "calypso run --local, cold (temporary server)"),
        ("kept", "calypso run --local, local server kept"),
        ("served", "calypso run, sent to calypso serve"),
    )
    for name, label in labels:
        wall = median(one[name])
        print(f"{label:>48}: {wall:6.2f} s, {wall / larch:5.1f}x larch's time")
    rate, loop = median(maps), median(loops)
    print(f"the service's first map: {args.spectra / first_map:.0f} spectra/s ({first_map:.2f} s)")
    print(
        f"{args.spectra}-spectrum map sent to serve (whole command): {rate:.0f} spectra/s; "
        f"vectorised loop {loop:.0f} spectra/s in one process; ratio per core "
        f"{rate / loop / cores:.2f}"
    )


if __name__ == "__main__":
    main()
