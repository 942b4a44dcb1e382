"""Golden before/after recording of every technique's outputs (a refactoring safety net).

Runs ``calypso run TECHNIQUE INPUT --json`` on sample data (``calypso sample-data``, default
seed) and on the real data of ``shared/data`` for the four techniques, and records, per case:

* the ``--json`` summary's key structure (nested keys, list lengths, value types) and its
  stable values (timings, run ids, catalogue ids, start/finish times and the Dask workers
  that ran chunks dropped; the work folder, the sample data's session folder and the real
  data folder replaced by placeholders);
* for every HDF5/NeXus output file, every dataset's shape, dtype and the SHA-256 of its bytes
  (string datasets after the same path normalisation; strings that are dates, hosts, versions,
  provenance or configuration JSON are listed but not hashed; a dataset that cannot be read is
  recorded with its error);
* for every text output (.xy, .xdi, .csv), the SHA-256 of its lines without the header lines
  that carry dates, times, run ids, versions or hosts.

Besides the standard library, h5py and numpy, it uses ``hdf5plugin`` when it is installed (a
Calypso dependency) so that compressed raw frames linked into the outputs can be read.

``compare`` then says whether two recordings are identical, arrays bit for bit and summaries
key for key.

Run it with the virtual environment's Python (it calls the ``calypso`` console script found
next to that Python, which imports whatever ``calypso`` package ``PYTHONPATH`` selects)::

    .venv/bin/python tests/golden/record.py record BEFORE.json [--work DIR]
    .venv/bin/python tests/golden/record.py compare BEFORE.json AFTER.json

To record an older checkout of the code, put a folder holding a ``calypso`` link to it first
on the path: ``PYTHONPATH=/tmp/beforepkg .venv/bin/python tests/golden/record.py record ...``.
The cases run one after another (each ``calypso run`` starts its own temporary Prefect
server); Calypso's and Prefect's state (catalogue, results, Prefect database) go into the
work folder, never into ``~/.calypso`` or ``~/.prefect``. A full recording takes a few
minutes on two cores. ``compare`` exits 1 when anything differs, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:  # Calypso's own dependency: the compression filters (bitshuffle/LZ4...) of raw frames
    import hdf5plugin  # registers the filters with HDF5
except ImportError:  # compressed datasets are then recorded with their read error
    hdf5plugin = None

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("CALYPSO_TEST_DATA", REPO.parent / "shared" / "data"))
FORMAT = 1
RUN_TIMEOUT_S = 600

# Summary keys whose values change from run to run (dropped at any depth).
VOLATILE_KEYS = frozenset(
    {
        "timings_s",
        "wall_s",
        "per_s",
        "frames_per_s",
        "flow_run_id",
        "catalogue_id",
        "started",
        "finished",
    }
)
# Summary keys whose values *and* list lengths depend on scheduling (the Dask workers, as
# host:pid, that ran chunks): recorded as present, nothing more.
SCHEDULING_KEYS = frozenset({"workers"})
# HDF5 string datasets (or groups holding them) written at run time: listed, not hashed.
VOLATILE_NAMES = frozenset(
    {"date", "provenance", "configuration", "version", "program", "host", "hostname"}
)
TEXT_SUFFIXES = (".xy", ".xdi", ".csv")
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx", ".nx5", ".hdf")
# Header lines of text outputs that may change from run to run.
VOLATILE_HEADER = re.compile(
    r"date|time|\brun\b|run[_ .-]?id|flow[_ .-]?run|version|host", re.IGNORECASE
)
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
SESSION = re.compile(r"^\d{8}$")


# -- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ``calypso run``: on sample data (``sample`` holds the sample-data options) or on a
    real input (``real``, relative to the data folder, written to an output folder)."""

    name: str
    technique: str
    options: tuple[str, ...] = ()
    sample: tuple[str, ...] | None = None
    real: str | None = None


def sets(*assignments: str) -> tuple[str, ...]:
    """``--set NAME=VALUE`` options."""
    return tuple(word for assignment in assignments for word in ("--set", assignment))


CASES: tuple[Case, ...] = (
    Case("diffraction-sample", "diffraction", sample=("--frames", "12")),
    Case(
        "diffraction-ceo2-pilatus",
        "diffraction",
        real="xrd/CeO2_Pilatus1M.tif",
        options=sets(
            f"poni={DATA / 'xrd' / 'CeO2_Pilatus1M.poni'}", "flip=ud", "npt=1512", "unit=2th_deg"
        ),
    ),
    Case("spectroscopy-sample-repeats", "spectroscopy", sample=("--repeats", "3")),
    Case("spectroscopy-sample-map", "spectroscopy", sample=("--spectra", "200")),
    Case(
        "spectroscopy-sample-map-energy-rows",
        "spectroscopy",
        sample=("--spectra", "200", "--energy-rows"),
    ),
    Case("spectroscopy-fe-metal-xdi", "spectroscopy", real="xas/fe_metal_rt.xdi"),
    Case("spectroscopy-cu-metal-xdi", "spectroscopy", real="xas/cu_metal_rt.xdi"),
    Case(
        "spectroscopy-fexafs-repeats",
        "spectroscopy",
        real="xas/fexafs",
        options=sets("mode=fluorescence", 'fluorescence=["Sum_Fe_Ka"]', "i0=I0", "exafs=false"),
    ),
    Case("tomography-sample", "tomography", sample=("--size", "12", "160", "300")),
    Case(
        "tomography-sample-preview",
        "tomography",
        sample=("--size", "12", "160", "300"),
        options=sets("mode=preview"),
    ),
    Case("tomography-tooth", "tomography", real="tomo/tooth.h5"),
    Case(
        "tomography-image-test-tiffs",
        "tomography",
        real="tomo/image_test",
        options=sets("angles=[-88.2, 91.8]"),
    ),
    Case("mx-sample-grid", "mx", sample=()),
    Case("mx-thaumatin-cbf", "mx", real="mx", options=sets("images=thau_*")),
)
WORKERS = "2"  # the same Dask cluster size whatever the machine


# -- normalisation --------------------------------------------------------------------------


@dataclass
class Normaliser:
    """Replaces machine- and day-specific parts of paths and strings by placeholders."""

    work: Path
    began: datetime
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, label in ((self.work, "<WORK>"), (DATA, "<DATA>")):
            for variant in {str(path.absolute()), os.path.realpath(path)}:
                self.replacements.append((variant, label))
        # The longest first, so a session folder is replaced before the work folder.
        self.replacements.sort(key=lambda pair: len(pair[0]), reverse=True)

    def add_session(self, session_dir: Path) -> None:
        """The dated session folder ``calypso sample-data`` names after today."""
        placeholder = str(session_dir.parent / "<SESSION>")
        for variant in {str(session_dir.absolute()), os.path.realpath(session_dir)}:
            self.replacements.append((variant, placeholder))
        self.replacements.sort(key=lambda pair: len(pair[0]), reverse=True)

    def text(self, value: str) -> str:
        for old, new in self.replacements:
            value = value.replace(old, new)
        return value

    def recent_dates(self) -> list[str]:
        """Dates of the recording (YYYY-MM-DD and YYYYMMDD), local and UTC."""
        dates: set[str] = set()
        now = datetime.now(UTC)
        day = self.began - timedelta(days=1)
        while day <= now + timedelta(days=1):
            dates.update({day.strftime("%Y-%m-%d"), day.strftime("%Y%m%d")})
            day += timedelta(days=1)
        return sorted(dates)

    def is_volatile_text(self, value: str) -> bool:
        """A string that holds the date of the recording (a run-time timestamp)."""
        return any(date in value for date in self.recent_dates())


# -- summaries --------------------------------------------------------------------------------


def structure(value: Any) -> Any:
    """Nested keys, list lengths and leaf types of a JSON value."""
    if isinstance(value, dict):
        return {
            key: "<scheduling-dependent>" if key in SCHEDULING_KEYS else structure(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return {"<list>": len(value), "<items>": [structure(item) for item in value]}
    return type(value).__name__


def stable(value: Any, normaliser: Normaliser) -> Any:
    """The JSON value without volatile keys, with normalised strings."""
    if isinstance(value, dict):
        return {
            key: stable(item, normaliser)
            for key, item in value.items()
            if key not in VOLATILE_KEYS | SCHEDULING_KEYS
        }
    if isinstance(value, list):
        return [stable(item, normaliser) for item in value]
    if isinstance(value, str):
        return normaliser.text(value)
    return value


def parse_summary(stdout: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        start = stdout.find("\n{")
        return json.loads(stdout[start + 1 :]) if start >= 0 else None


# -- output files --------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _string_values(data: Any) -> list[str]:
    array = np.asarray(data, dtype=object).ravel()
    return [
        item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in array
    ]


def _is_string(dataset: h5py.Dataset) -> bool:
    return dataset.dtype.kind in "SUO" or h5py.check_string_dtype(dataset.dtype) is not None


def record_dataset(name: str, dataset: h5py.Dataset, normaliser: Normaliser) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(dataset.shape), "dtype": str(dataset.dtype)}
    parts = set(name.lower().split("/"))
    try:
        if _is_string(dataset):
            if parts & VOLATILE_NAMES:
                entry["skipped"] = "volatile name"
                return entry
            values = [normaliser.text(v) for v in _string_values(dataset[()])]
            if any(normaliser.is_volatile_text(v) for v in values):
                entry["skipped"] = "holds the recording date"
                return entry
            entry["sha256"] = sha256(json.dumps(values).encode())
            return entry
        data = dataset[()]
        array = np.asarray(data)
        if array.dtype.kind == "O":  # variable-length non-string data
            entry["sha256"] = sha256(repr(array.tolist()).encode())
        else:
            entry["sha256"] = sha256(np.ascontiguousarray(array).tobytes())
    except Exception as exc:  # a broken link or missing VDS source: recorded, not fatal
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def record_hdf5(path: Path, normaliser: Normaliser) -> dict[str, Any]:
    datasets: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def walk(group: h5py.Group, prefix: str) -> None:
        for key in sorted(group):
            name = f"{prefix}{key}"
            try:
                item = group[key]
            except Exception as exc:  # broken external link
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            if isinstance(item, h5py.Dataset):
                datasets[name] = record_dataset(name, item, normaliser)
            elif isinstance(item, h5py.Group):
                walk(item, name + "/")

    with h5py.File(path, "r") as h5:
        walk(h5, "")
    result: dict[str, Any] = {"kind": "hdf5", "datasets": datasets}
    if errors:
        result["link_errors"] = errors
    return result


def record_text(path: Path, normaliser: Normaliser) -> dict[str, Any]:
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(errors="replace").splitlines():
        line = normaliser.text(line)
        header = line.lstrip().startswith("#")
        if (header and (VOLATILE_HEADER.search(line) or TIMESTAMP.search(line))) or (
            normaliser.is_volatile_text(line)
        ):
            dropped += 1
            continue
        kept.append(line)
    return {
        "kind": "text",
        "lines": len(kept),
        "dropped_lines": dropped,
        "sha256": sha256("\n".join(kept).encode()),
    }


def output_files(root: Path) -> Iterator[Path]:
    """Files under ``root``, hidden folders and files (a run's part folder) left out."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def record_outputs(root: Path, normaliser: Normaliser) -> dict[str, Any]:
    files: dict[str, Any] = {}
    if not root.is_dir():
        return files
    for path in output_files(root):
        relative = normaliser.text(str(path.relative_to(root)))
        suffix = path.suffix.lower()
        if suffix in HDF5_SUFFIXES or (suffix not in TEXT_SUFFIXES and h5py.is_hdf5(path)):
            try:
                files[relative] = record_hdf5(path, normaliser)
            except OSError as exc:
                files[relative] = {"kind": "hdf5", "error": f"{type(exc).__name__}: {exc}"}
        elif suffix in TEXT_SUFFIXES:
            files[relative] = record_text(path, normaliser)
        else:
            files[relative] = {"kind": "other (not hashed)"}
    return files


# -- running -------------------------------------------------------------------------------------


def calypso_command() -> list[str]:
    """The ``calypso`` console script next to this Python (it works whichever module the
    CLI's ``main`` lives in)."""
    script = Path(sys.executable).with_name("calypso")
    if script.exists():
        return [str(script)]
    found = shutil.which("calypso")
    if found is None:
        sys.exit("record.py: no `calypso` command next to this Python nor on PATH")
    return [found]


def run_environment(work: Path) -> dict[str, str]:
    """This environment without Calypso or Prefect server settings; state inside ``work``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CALYPSO_") and name not in ("PREFECT_API_URL", "PREFECT_HOME")
    }
    config = work / "config.toml"
    config.touch()
    env.update(
        CALYPSO_HOME=str(work / "calypso-home"),
        CALYPSO_CONFIG=str(config),
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The sample data is made from the real spectra found there (a model edge without
        # them): the same for every checkout recorded, wherever it lies.
        CALYPSO_TEST_DATA=str(DATA),
    )
    return env


def run(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(command, 124, str(exc.stdout or ""), f"timeout: {exc}")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def prepare_sample(
    case: Case, case_dir: Path, env: dict[str, str], normaliser: Normaliser
) -> tuple[str, list[str]]:
    """Write the case's sample data; the raw dataset and the options it says to run with."""
    assert case.sample is not None
    root = case_dir / "visitor"
    command = [*calypso_command(), "sample-data", case.technique, str(root), *case.sample]
    done = run(command, case_dir, env)
    if done.returncode != 0:
        raise RuntimeError(f"sample-data failed ({done.returncode}): {tail(done.stderr)}")
    lines = done.stdout.splitlines()
    raw = next(line.split(":", 1)[1].split(" (")[0].strip() for line in lines if
               line.startswith("raw dataset:"))  # fmt: skip
    parts = Path(raw).relative_to(root).parts
    if len(parts) > 2 and SESSION.match(parts[2]):
        normaliser.add_session(root.joinpath(*parts[:3]))
    index = next(i for i, line in enumerate(lines) if line.startswith("reduce it with"))
    words = shlex.split(lines[index + 1])
    return raw, words[words.index(raw) + 1 :]


def record_case(
    case: Case, case_dir: Path, env: dict[str, str], normaliser: Normaliser
) -> dict[str, Any]:
    case_dir.mkdir(parents=True)
    began = time.monotonic()
    result: dict[str, Any] = {"technique": case.technique}
    if case.sample is not None:
        try:
            raw, printed = prepare_sample(case, case_dir, env, normaliser)
        except (RuntimeError, StopIteration, ValueError) as exc:
            result["error"] = f"sample data: {exc}"
            return result
        output_root = None
        arguments = [raw, *printed, *case.options]
    else:
        assert case.real is not None
        output_root = case_dir / "out"
        arguments = [str(DATA / case.real), *case.options, "--output", str(output_root)]
    command = [*calypso_command(), "run", case.technique, *arguments]
    command += ["--workers", WORKERS, "--json"]
    result["command"] = normaliser.text(shlex.join(["calypso", *command[1:]]))
    done = run(command, case_dir, env)
    result["returncode"] = done.returncode
    if done.returncode != 0:
        result["stderr_tail"] = normaliser.text(tail(done.stderr))
    summary = parse_summary(done.stdout) if done.stdout.strip() else None
    if summary is not None:
        result["summary_structure"] = structure(summary)
        result["summary"] = stable(summary, normaliser)
    if output_root is None:  # data policy: PROCESSED_DATA inside the sample's session folder
        found = sorted(case_dir.glob("visitor/*/*/*/PROCESSED_DATA"))
        output_root = found[0] if found else case_dir / "PROCESSED_DATA"
    result["output_root"] = normaliser.text(str(output_root))
    result["files"] = record_outputs(output_root, normaliser)
    result["seconds"] = round(time.monotonic() - began, 1)  # informative, not compared
    return result


def which_calypso(env: dict[str, str], cwd: Path) -> str:
    probe = [sys.executable, "-c", "import calypso; print(calypso.__file__)"]
    done = run(probe, cwd, env, timeout=120)
    return done.stdout.strip() or done.stderr.strip()


def command_record(args: argparse.Namespace) -> int:
    out = Path(args.output).absolute()
    if args.work:
        work = Path(args.work).absolute()
        if work.exists() and any(work.iterdir()):
            sys.exit(f"record.py: --work {work} is not empty (give a new or empty folder)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="calypso-golden-"))
    began = datetime.now(UTC)
    start = time.monotonic()
    normaliser = Normaliser(work, began)
    env = run_environment(work)
    selected = [c for c in CASES if not args.case or any(p in c.name for p in args.case)]
    recording: dict[str, Any] = {
        "format": FORMAT,
        "meta": {
            "calypso": which_calypso(env, work),
            "command": calypso_command()[0],
            "work": str(work),
            "recorded": began.isoformat(timespec="seconds"),
            "hdf5plugin": hdf5plugin is not None,
        },
        "cases": {},
    }
    print(f"calypso package: {recording['meta']['calypso']}; work folder: {work}", flush=True)
    for case in selected:
        print(f"{case.name} ...", end=" ", flush=True)
        result = record_case(case, work / "cases" / case.name, env, normaliser)
        recording["cases"][case.name] = result
        count = sum(len(f.get("datasets", {})) or 1 for f in result.get("files", {}).values())
        status = result.get("error") or f"exit {result.get('returncode')}"
        print(f"{status}, {len(result.get('files', {}))} files, {count} items, "
              f"{result.get('seconds', 0)} s", flush=True)  # fmt: skip
    recording["meta"]["seconds"] = round(time.monotonic() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recording, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} in {recording['meta']['seconds']} s")
    return 0


# -- comparing -----------------------------------------------------------------------------------


def diff_values(before: Any, after: Any, where: str, report: Callable[[str], None]) -> None:
    """Report every difference between two JSON values, key for key."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            here = f"{where}.{key}" if where else str(key)
            if key not in after:
                report(f"{here}: missing after (was {_short(before[key])})")
            elif key not in before:
                report(f"{here}: new after ({_short(after[key])})")
            else:
                diff_values(before[key], after[key], here, report)
    elif isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            report(f"{where}: list length {len(before)} -> {len(after)}")
        for index, (first, second) in enumerate(zip(before, after, strict=False)):
            diff_values(first, second, f"{where}[{index}]", report)
    elif type(before) is not type(after) or before != after:
        report(f"{where}: {_short(before)} -> {_short(after)}")


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


CASE_FIELDS = ("technique", "error", "returncode", "output_root")


def compare_case(before: dict[str, Any], after: dict[str, Any], report: Callable[[str], None]):
    for name in CASE_FIELDS:
        if before.get(name) != after.get(name):
            report(f"{name}: {_short(before.get(name))} -> {_short(after.get(name))}")
    if before.get("command") != after.get("command"):
        report(f"command: {before.get('command')} -> {after.get('command')}")
    diff_values(
        before.get("summary_structure"),
        after.get("summary_structure"),
        "summary structure",
        report,
    )
    diff_values(before.get("summary"), after.get("summary"), "summary", report)
    files_before, files_after = before.get("files", {}), after.get("files", {})
    for path in sorted(set(files_before) | set(files_after)):
        if path not in files_after:
            report(f"file {path}: missing after")
            continue
        if path not in files_before:
            report(f"file {path}: new after")
            continue
        first, second = files_before[path], files_after[path]
        sets_before, sets_after = first.get("datasets"), second.get("datasets")
        if sets_before is None or sets_after is None:
            diff_values(first, second, f"file {path}", report)
            continue
        for key in ("kind", "error", "link_errors"):
            diff_values(first.get(key), second.get(key), f"file {path} {key}", report)
        for name in sorted(set(sets_before) | set(sets_after)):
            if name not in sets_after:
                report(f"file {path} dataset {name}: missing after")
            elif name not in sets_before:
                report(f"file {path} dataset {name}: new after")
            else:
                a, b = sets_before[name], sets_after[name]
                for key in sorted(set(a) | set(b)):
                    if a.get(key) != b.get(key):
                        report(
                            f"file {path} dataset {name}: {key} "
                            f"{_short(a.get(key))} -> {_short(b.get(key))}"
                        )


def count_items(recording: dict[str, Any]) -> int:
    """HDF5 datasets plus text files recorded."""
    total = 0
    for case in recording["cases"].values():
        for entry in case.get("files", {}).values():
            if "datasets" in entry:
                total += len(entry["datasets"])
            elif entry.get("kind") == "text":
                total += 1
    return total


def command_compare(args: argparse.Namespace) -> int:
    before = json.loads(Path(args.before).read_text())
    after = json.loads(Path(args.after).read_text())
    differences = 0

    for name in sorted(set(before["cases"]) | set(after["cases"])):

        def report(message: str, case: str = name) -> None:
            nonlocal differences
            differences += 1
            print(f"{case}: {message}")

        if name not in after["cases"]:
            report("case missing after")
        elif name not in before["cases"]:
            report("case new after")
        else:
            compare_case(before["cases"][name], after["cases"][name], report)
    if differences:
        print(f"{differences} differences")
        return 1
    print(f"identical: {len(before['cases'])} cases, {count_items(before)} datasets")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="run every case and write the recording")
    record.add_argument("output", metavar="OUT.json")
    record.add_argument("--work", metavar="DIR", help="new or empty folder (default: a temp one)")
    record.add_argument(
        "--case", action="append", metavar="TEXT", help="only cases whose name contains TEXT"
    )
    record.set_defaults(handler=command_record)
    compare = commands.add_parser("compare", help="print every difference; exit 1 if any")
    compare.add_argument("before", metavar="BEFORE.json")
    compare.add_argument("after", metavar="AFTER.json")
    compare.set_defaults(handler=command_compare)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
