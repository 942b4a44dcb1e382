"""Ctrl-C (or SIGTERM) at random moments of ``calypso run``: does each command end well?

A terminal sends Ctrl-C to the command's whole process group, wherever its threads are:
importing, starting Prefect's server, planning, integrating, writing, publishing. Each
try runs one command on sample data written here, in a new home (``--home cold``: a
temporary Prefect server, nothing kept) or a home kept for all tries (``--home kept``:
the local Prefect server and cluster the first command leaves), and signals it after a
random delay in ``--window`` seconds. A try is good when

* the command ends within 60 s, with exit status 0 (it had finished) or 130 (the
  interrupted one line, ``calypso: error: interrupted``, last); with ``--signal TERM``,
  Prefect's own way: the flow run crashed, the process ended by SIGTERM (-15);
* it printed no traceback;
* no record of its run is left ``running`` (a Ctrl-C's says failed, "interrupted ...");
* a cold home has no process left 15 s later (its temporary server, its Dask workers).

A signal before the command's ``main()`` runs (Python's own start, then the imports of
the command line module: the first ~50 ms) ends it as it ends any Python program (a
traceback, killed by SIGINT): counted apart.

Not part of ``make test`` (minutes, random by design). Prints each try and how many were
bad; exit status 1 if any was.

    python tests/sweeps/ctrl_c.py --technique diffraction --home cold --tries 30 --window 3:6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import REPO, scratch_folder

TECHNIQUES = ("diffraction", "spectroscopy", "tomography", "mx", "xas-map")
LEFT_S = 15.0  # a new home's processes still there this long after the command: left


def sample(technique: str, root: Path) -> tuple[str, list[str]]:
    """The technique to run and its arguments, on sample data written under ``root``."""
    if technique == "spectroscopy":  # a real XAS spectrum of the shared data
        data = Path(os.environ.get("CALYPSO_TEST_DATA", REPO.parent / "shared" / "data"))
        (root / "standards").mkdir(parents=True)
        spectrum = shutil.copy(data / "xas" / "fe_metal_rt.xdi", root / "standards")
        return technique, [str(spectrum)]
    if technique == "diffraction":
        from calypso.flows.samples.diffraction import write_diffraction_sample

        written = write_diffraction_sample(root, frames=120, seed=1)
        calibration = written.calibration
        options = ["--set", f"poni={calibration['poni']}", "--set", f"mask={calibration['mask']}"]
        return technique, [str(written.raw_dataset_dir), *options]
    if technique == "tomography":
        from calypso.flows.samples.tomography import write_tomography_sample

        return technique, [str(write_tomography_sample(root).raw_dataset_dir)]
    if technique == "mx":
        from calypso.flows.samples.mx import write_mx_sample

        return technique, [str(write_mx_sample(root).raw_dataset_dir)]
    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample

    return "spectroscopy", [str(write_spectroscopy_map_sample(root, 20_000).raw_dataset_dir)]


def processes_of(home: Path, but: int) -> list[str]:
    """The command lines of the processes whose Calypso home is ``home``, but ``but``."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        with suppress(psutil.Error):
            ours = (process.info["environ"] or {}).get("CALYPSO_HOME") == str(home)
            if ours and process.pid != but:
                found.append(" ".join(process.info["cmdline"] or [])[:100])
    return found


def processes_left(home: Path, but: int) -> list[str]:
    """Those of :func:`processes_of` still there :data:`LEFT_S` after the command ended
    (a temporary server stopped as it starts takes Prefect's graceful shutdown, seconds)."""
    deadline = time.monotonic() + LEFT_S
    while (alive := processes_of(home, but)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def running_records(home: Path) -> list[str]:
    from calypso.registry.catalogue import SQLiteCatalogue

    catalogue = home / "catalogue.sqlite"
    if not catalogue.exists():
        return []
    records = SQLiteCatalogue(catalogue).list()
    return [f"record {r.id}" for r in records if r.status == "running"]


def one_try(command: list[str], env: dict[str, str], delay: float, number: int, log: Path):
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a shell does
        )  # fmt: skip
    time.sleep(delay)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, number)
    sent = time.monotonic()
    try:
        status: int | str = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        status = "still running after 60 s"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.pid, status, time.monotonic() - sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", choices=TECHNIQUES, default="diffraction")
    parser.add_argument("--home", choices=("cold", "kept"), default="cold")
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--window", default="0:6", help="LO:HI seconds after the start")
    parser.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    args = parser.parse_args()
    low, high = (float(x) for x in args.window.split(":"))
    number = getattr(signal, f"SIG{args.signal}")
    good = {0, 130} if args.signal == "INT" else {0, 130, -signal.SIGTERM}

    work = scratch_folder("calypso-ctrl-c-")
    root = work / "visitor"
    technique, arguments = sample(args.technique, root)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env["CALYPSO_DATA_ROOTS"] = json.dumps([str(work)])
    if args.home == "cold":
        env.update(CALYPSO_SERVER__LOCAL_KEEP_S="0", CALYPSO_EXECUTOR__LOCAL_KEEP_S="0")
    bad = early = 0
    for index in range(args.tries):
        home = work / (f"home-{index}" if args.home == "cold" else "home")
        home.mkdir(exist_ok=True)
        env.update(CALYPSO_HOME=str(home / "calypso"), PREFECT_HOME=str(home / "prefect"))
        command = [sys.executable, "-m", "calypso.flows.cli", "run", technique, *arguments]
        command += ["--output", str(root / f"out-{index}"), "--local"]
        delay = random.uniform(low, high)
        log = work / f"try-{index}.log"
        pid, status, took = one_try(command, env, delay, number, log)
        said = log.read_text(errors="replace")
        last = said.strip().splitlines()[-1] if said.strip() else ""
        if status == -signal.SIGINT or "init_import_site" in said:
            # Before the command's main() ran (Python's start, the command line module's
            # imports: the first ~50 ms), as any Python program.
            early += 1
            print(f"try {index}: signal at {delay:.2f} s, before main() ran")
            continue
        problems = [] if status in good else [f"exit status {status}"]
        if "Traceback" in said or "Logging error" in said:
            problems.append("a traceback")
        if status == 130 and last != "calypso: error: interrupted":
            problems.append(f"its last line: {last[:120]!r}")
        if left := running_records(home / "calypso"):
            problems.append(f"records left running: {left}")
        if args.home == "cold" and (alive := processes_left(home / "calypso", pid)):
            problems.append(f"processes left {LEFT_S:g} s later: {alive}")
        bad += bool(problems)
        verdict = "; ".join(problems) or "good"
        print(f"try {index}: signal at {delay:.2f} s, exit {status} {took:.1f} s later: {verdict}")
        if problems:
            print(said[-3000:], flush=True)
    print(
        f"{bad} bad of {args.tries} ({args.technique}, {args.home} home, SIG{args.signal}); "
        f"{early} before the command's main() ran"
    )
    if args.home == "kept":  # the local server and cluster the tries kept: stopped with them
        for process in psutil.process_iter(["environ"]):
            with suppress(psutil.Error):
                if (process.info["environ"] or {}).get("CALYPSO_HOME", "").startswith(str(work)):
                    process.terminate()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
