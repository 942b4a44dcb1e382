"""The command line: bad input is refused with one clear message and nothing written."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from calypso.flows.cli import main
from calypso.registry import SQLiteCatalogue
from tests import processes
from tests.damage import damage_stored_frame


def calypso(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def dataset(diffraction_sample, tmp_path):
    """A private copy of the sample, in the data policy layout, that tests may damage."""
    raw = diffraction_sample.dataset
    copy_root = tmp_path / "visitor"
    target = copy_root / raw.raw_dataset_dir.relative_to(raw.root)
    shutil.copytree(raw.raw_dataset_dir, target)
    return target


@pytest.fixture
def options(diffraction_sample):
    poni, mask = diffraction_sample.calibration["poni"], diffraction_sample.calibration["mask"]
    return ["--set", f"poni={poni}", "--set", f"mask={mask}"]


def processed_dir(raw_dataset_dir: Path) -> Path:
    parts = list(raw_dataset_dir.parts)
    parts[parts.index("RAW_DATA")] = "PROCESSED_DATA"
    return Path(*parts)


BAD_INPUTS = {
    "wrong path": (lambda d, t: ([str(d) + "_nope"], "does not exist", 3)),
    "missing scan": (lambda d, t: ([d, "--scan", "7"], "has no scan 7; its scans are 1", 3)),
    "missing detector": (
        lambda d, t: (
            [d, "--set", "detector=eiger"],
            "no scan has detector 'eiger'; its detectors: pilatus1m",
            3,
        )
    ),
    "unknown parameter": (
        lambda d, t: ([d, "--set", "nbpt=10"], "unknown diffraction parameter 'nbpt'", 2)
    ),
    "mistyped parameter": (lambda d, t: ([d, "--set", "npt=many"], "npt: Input should be", 2)),
    "missing counter": (
        lambda d, t: ([d, "--set", "monitor=I0"], "no counter 'I0' for 'monitor'; its counters", 2)
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_clearly(case, dataset, options, tmp_path, capsys):
    arguments, message, code = BAD_INPUTS[case](dataset, tmp_path)
    status, _, err = calypso(capsys, "run", "diffraction", *arguments, *options)
    assert status == code
    assert message in err
    assert err.startswith("calypso: error: ") and err.count("\n") == 1  # one message
    assert "Traceback" not in err
    # Only the run's hidden part folder stays, for a retry of the same flow run.
    assert [
        p for p in files_under(processed_dir(dataset)) if ".calypso-partial-" not in str(p)
    ] == []


def test_missing_lima_files(dataset, options, capsys):
    (dataset / "scan0001" / "pilatus1m_0000.h5").unlink()
    status, _, err = calypso(capsys, "run", "diffraction", dataset, *options)
    assert status == 3
    assert "scan0001/pilatus1m_0000.h5 is missing" in err and "never read as zeros" in err


def test_not_a_bliss_file(dataset, options, capsys):
    bliss_file = dataset / f"{dataset.name}.h5"
    bliss_file.write_text("this is not HDF5")
    status, _, err = calypso(capsys, "run", "diffraction", dataset, *options)
    assert status == 3 and f"{bliss_file} cannot be opened as HDF5" in err


def test_unreadable_poni(dataset, tmp_path, capsys):
    poni = tmp_path / "broken.poni"
    poni.write_text("Distance: far away\nPoni1: ?\n")
    status, _, err = calypso(capsys, "run", "diffraction", dataset, "--set", f"poni={poni}")
    assert status == 2 and f"PONI file {poni} cannot be read" in err
    status, _, err = calypso(capsys, "run", "diffraction", dataset)
    assert status == 2 and "no geometry: give the calibration as --set poni=" in err


def test_mask_of_the_wrong_shape(dataset, diffraction_sample, tmp_path, capsys):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.zeros((516, 516), np.int8))
    poni = diffraction_sample.calibration["poni"]
    status, _, err = calypso(
        capsys, "run", "diffraction", dataset, "--set", f"poni={poni}", "--set", f"mask={mask}"
    )
    assert status == 2
    assert f"mask {mask} has shape (516, 516) but the detector frames are (1043, 981)" in err


def test_image_outside_the_policy_needs_an_output(test_data, tmp_path, capsys):
    xrd = test_data / "xrd"
    status, _, err = calypso(
        capsys,
        "run",
        "diffraction",
        xrd / "CeO2_Pilatus1M.tif",
        "--set",
        f"poni={xrd / 'CeO2_Pilatus1M.poni'}",
    )
    assert status == 2 and "give --output DIR" in err


def test_failure_inside_the_flow_leaves_nothing_that_looks_complete(
    dataset, options, catalogue_path, capsys, on_shared_cluster
):
    # A beam loss at frame 7 is found before anything runs, and named as frame 7 (chunks
    # counted their own frames: it was "frame 3" of the second chunk).
    with h5py.File(dataset / f"{dataset.name}.h5", "a") as h5:
        h5["1.1/instrument/mon/data"][7] = 0.0
    status, _, err = calypso(
        capsys, "run", "diffraction", dataset, *options, "--set", "monitor=mon"
    )
    assert status == 3 and "monitor 'mon' is 0.0 at frame 7: cannot normalise" in err
    assert not processed_dir(dataset).exists() and SQLiteCatalogue(catalogue_path).list() == []
    # A frame whose stored bytes are damaged is found by the chunk that reads it.
    damage_stored_frame(dataset, 7)
    status, _, err = calypso(
        capsys, "run", "diffraction", dataset, *options, "--set", "chunk_size=4"
    )
    assert status == 3 and "frames 4-7" in err and "cannot be read" in err
    # Only the run's hidden part folder stays, for a retry of the same flow run.
    assert [
        p for p in files_under(processed_dir(dataset)) if ".calypso-partial-" not in str(p)
    ] == []
    [record] = SQLiteCatalogue(catalogue_path).list()
    assert record.status == "failed" and "cannot be read" in record.message


def test_unreachable_prefect_server_is_a_configuration_error(dataset, options, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    status, _, err = calypso(capsys, "run", "diffraction", dataset, *options)
    assert status == 2
    assert "the Prefect API at http://127.0.0.1:9/api does not answer" in err
    assert "calypso server" in err
    # Only the run's hidden part folder stays, for a retry of the same flow run.
    assert [
        p for p in files_under(processed_dir(dataset)) if ".calypso-partial-" not in str(p)
    ] == []


def test_parameters_file_and_listing(dataset, options, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("npt: 200\nunit: 2th_deg\nmonitor: mon\nmonitor_reference: 1.0e5\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"npt": 200,')
    status, _, err = calypso(capsys, "run", "diffraction", dataset, "--params", bad)
    assert status == 2 and f"parameter file {bad} cannot be parsed" in err
    status, out, _ = calypso(capsys, "parameters", "diffraction")
    assert status == 0 and "polarization_factor" in out and "monitor_reference" in out


# The local services' life once unused (the test holds them between its two commands,
# as a living command does, so a loaded machine's slow start does not matter).
KEEP_S = 6


def test_without_a_server_the_first_run_starts_the_local_one_and_the_next_uses_it(
    diffraction_sample, tmp_path, capsys, monkeypatch
):
    """Real `calypso run` processes with no Prefect server configured: the first starts
    the home's local server (calypso.flows.local_server), quietly, and integrates in its
    own threads; the next uses the server. A map's batches need worker processes: its
    command starts the home's local Dask cluster (calypso.executors.kept), and a
    diffraction command after it sends its chunks there. Unused, both stop."""
    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CALYPSO_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        CALYPSO_HOME=str(tmp_path / "calypso"),
        CALYPSO_SERVER__LOCAL_KEEP_S=str(KEEP_S),
        CALYPSO_EXECUTOR__LOCAL_KEEP_S=str(KEEP_S),
        CALYPSO_EXECUTOR__N_WORKERS="1",
    )
    output = tmp_path / "out"
    poni, mask = diffraction_sample.calibration["poni"], diffraction_sample.calibration["mask"]
    raw = str(diffraction_sample.raw_dataset_dir)
    command = ["run", "diffraction", raw, "--set", f"poni={poni}", "--set", f"mask={mask}"]
    result = processes.run([*command, "--output", str(output), "--json"], env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # no tracebacks, no shutdown noise
    summary = json.loads(result.stdout)
    assert summary["frames"] == 12 and Path(summary["outputs"][0].split("::")[0]).is_file()
    address = tmp_path / "calypso" / "local-server.json"
    local = json.loads(address.read_text())
    assert oct(address.stat().st_mode & 0o777) == "0o600"
    clusters, kept = tmp_path / "calypso" / "clusters", {}
    assert not list(clusters.glob("*.json"))  # its chunks ran in its threads: none kept
    held = [_hold(tmp_path / "calypso" / ".local-server.use")]
    try:
        again = processes.run([*command, "--output", str(tmp_path / "again"), "--json"], env, 300)
        assert again.returncode == 0 and again.stderr.strip() == "", again.stderr
        assert json.loads(address.read_text()) == local  # the same server, still running
        assert not list(clusters.glob("*.json"))
        # A map's command starts the kept cluster (worker processes) ...
        xas = write_spectroscopy_map_sample(tmp_path / "visitor", 200, seed=3)
        mapped = processes.run(
            ["run", "spectroscopy", str(xas.raw_dataset_dir), "--output", str(tmp_path / "map")],
            env,
            timeout=300,
        )
        assert mapped.returncode == 0, mapped.stderr
        # the sample's noisiest pixels are named, nothing else is said
        assert all(line.startswith("calypso: warning:") for line in mapped.stderr.splitlines())
        [cluster] = clusters.glob("*.json")
        kept = json.loads(cluster.read_text())
        assert kept["address"].startswith("tls://127.0.0.1:")
        assert oct(cluster.parent.stat().st_mode & 0o777) == "0o700"
        held.append(_hold(cluster.with_suffix(".use")))
        # ... and a diffraction command after it integrates on that cluster's worker.
        on_kept = processes.run([*command, "--output", str(tmp_path / "kept"), "--json"], env, 300)
        assert on_kept.returncode == 0 and on_kept.stderr.strip() == "", on_kept.stderr
        workers = {int(w.rsplit(":", 1)[1]) for w in json.loads(on_kept.stdout)["workers"]}
        keepers = {p.pid for p in psutil.Process(kept["pid"]).children(recursive=True)}
        assert workers and workers <= keepers, (workers, keepers)
        for use in held:
            use.close()
        assert list(clusters.glob("*.json")) == [cluster]  # the same cluster
        # Every run is on the server, seen with the secret of the home (and not without).
        secret = (tmp_path / "calypso" / "prefect-auth").read_text().strip()
        runs = _post(f"{local['url']}/flow_runs/filter", {"limit": 10}, secret)
        assert sorted(r["state_type"] for r in runs) == ["COMPLETED"] * 4
        with pytest.raises(urllib.error.HTTPError, match="401"):
            _post(f"{local['url']}/flow_runs/filter", {"limit": 10}, None)
        monkeypatch.setenv("CALYPSO_HOME", env["CALYPSO_HOME"])  # the home's catalogue
        monkeypatch.delenv("CALYPSO_CATALOGUE__PATH", raising=False)
        status, out, _ = calypso(capsys, "catalogue", "list")
        assert status == 0 and str(output) in out
        status, out, _ = calypso(capsys, "cluster", "kept")  # what the home keeps
        assert status == 0 and local["url"] in out and kept["address"] in out
        # Unused for KEEP_S and no flow run active: the keepers stop their server and
        # cluster by themselves and take their addresses away.
        deadline = time.monotonic() + 120
        while (address.exists() or cluster.exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not address.exists() and not cluster.exists()
        assert calypso(capsys, "cluster", "kept")[1].startswith("none kept in ")
    finally:
        for use in held:
            use.close()
        left = [local["pid"]] if address.exists() else []
        left += [kept["pid"]] if kept and list(clusters.glob("*.json")) else []
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("keep_s", [0, 60], ids=["temporary", "local"])
def test_input_refused_before_the_run_leaves_no_prefect_server_behind(keep_s, tmp_path):
    """With no server configured, `calypso run` starts Prefect's server (temporary or the
    home's local one) while it reads its input; when the input is refused, that server
    goes with the command: nothing that would live on in the background."""
    bad = tmp_path / "bad.xdi"
    bad.write_text("# XDI/1.0\n# Column.1: energy eV\n# Column.2: i0\n#----\n1 2\nfoo bar\n")
    env = _without_server(tmp_path, keep_s)
    result = processes.run(
        ["run", "spectroscopy", str(bad), "--output", str(tmp_path / "out")], env, timeout=120
    )
    assert result.returncode == 3 and "bad.xdi: not a column file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if keep_s:  # the keeper was started, and stopped
        assert (tmp_path / "calypso" / "local-server.log").exists()
        assert not (tmp_path / "calypso" / "local-server.json").exists()
    assert _left_after(f"PREFECT_HOME={tmp_path / 'prefect'}", 10) == []


@pytest.mark.parametrize("after_s", [0, 3], ids=["as-it-starts", "started"])
def test_a_killed_command_takes_its_temporary_prefect_server_with_it(test_data, tmp_path, after_s):
    """SIGKILL leaves a command no time to stop what it started: its temporary Prefect
    server notices that the command has gone and stops by itself (Dask's workers do too),
    whether it was still starting or already serving."""
    env = _without_server(tmp_path)
    spectrum = test_data / "xas" / "fe_metal_rt.xdi"
    command = [sys.executable, "-m", "calypso.flows.cli", "run", "spectroscopy", str(spectrum)]
    process = subprocess.Popen(
        [*command, "--output", str(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ours = f"PREFECT_HOME={tmp_path / 'prefect'}"
    try:
        deadline = time.monotonic() + 60
        while not [pid for pid in _processes_with(ours) if pid != process.pid]:
            assert process.poll() is None and time.monotonic() < deadline, "no server started"
            time.sleep(0.05)
        time.sleep(after_s)
    finally:
        process.kill()
        process.wait()
    assert _left_after(ours, 15) == []


def test_ctrl_c_at_the_terminal_stops_a_cold_command_at_once_in_one_line(tmp_path):
    """A terminal's Ctrl-C goes to the whole group: the command's temporary Prefect server
    and Dask workers stopped on their own, with tracebacks, and the command then retried
    its last reports against the server gone for a minute or more."""
    from calypso.flows.samples.tomography import write_tomography_sample

    sample = write_tomography_sample(tmp_path / "visitor", projections=180)
    env = _without_server(tmp_path) | {"CALYPSO_EXECUTOR__LOCAL_KEEP_S": "0"}
    command = [sys.executable, "-m", "calypso.flows.cli", "run", "tomography"]
    process = subprocess.Popen(
        [*command, str(sample.raw_dataset_dir), "--output", str(tmp_path / "out")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # as at a terminal: pytest-xdist's workers ignore SIGINT, which children inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    ours = f"PREFECT_HOME={tmp_path / 'prefect'}"
    try:
        deadline = time.monotonic() + 120
        while len(_processes_with(ours)) < 3:  # the command, its server, its workers
            assert process.poll() is None and time.monotonic() < deadline, "nothing started"
            time.sleep(0.05)
        time.sleep(1)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.decode()
    assert process.returncode in (0, 130), text[-3000:]  # or it had ended already
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    if process.returncode == 130:
        assert text.strip().splitlines()[-1] == "calypso: error: interrupted", text[-3000:]
    assert _left_after(ours, 20) == []


def test_a_cold_command_leaves_its_run_recorded_and_its_server_gone(test_data, tmp_path):
    """A command does not wait for its temporary server's shutdown (~0.2 s of ``uvicorn``
    looking for it): the server ends by itself soon after, and what the command sent it
    is in its database, the run completed with its task run."""
    import sqlite3

    env = _without_server(tmp_path)
    spectrum = test_data / "xas" / "fe_metal_rt.xdi"
    command = ["run", "spectroscopy", str(spectrum), "--output", str(tmp_path / "out"), "--json"]
    result = processes.run(command, env, timeout=300)
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["flow_run_id"]
    assert _left_after(f"PREFECT_HOME={tmp_path / 'prefect'}", 15) == []
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        [(state,)] = db.execute(
            "SELECT state_type FROM flow_run WHERE id = ?", (run_id,)
        ).fetchall()
        tasks = db.execute(
            "SELECT state_type FROM task_run WHERE flow_run_id = ?", (run_id,)
        ).fetchall()
    assert state == "COMPLETED"
    assert tasks and {task for (task,) in tasks} == {"COMPLETED"}


def _without_server(tmp_path: Path, keep_s: float = 0) -> dict[str, str]:
    """This environment without Prefect's and Calypso's settings, homes under ``tmp_path``:
    a command run in it starts a Prefect server of its own (kept ``keep_s``; 0: temporary)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CALYPSO_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        CALYPSO_HOME=str(tmp_path / "calypso"),
        CALYPSO_SERVER__LOCAL_KEEP_S=str(keep_s),
    )
    return env


def _left_after(variable: str, timeout_s: float) -> list[int]:
    """The processes with ``variable`` still there once they are gone or ``timeout_s`` has
    passed."""
    deadline = time.monotonic() + timeout_s
    while _processes_with(variable) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _processes_with(variable)


def _processes_with(variable: str) -> list[int]:
    """This account's processes whose environment holds ``variable`` (NAME=VALUE)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or another account's
            continue
    return found


def _hold(use: Path):
    """The shared lock a living command holds on a kept service (executors/kept.py)."""
    import fcntl

    file = open(use, "a")  # noqa: SIM115 (closed by the test)
    fcntl.flock(file, fcntl.LOCK_SH)
    return file


def _post(url: str, body: dict, secret: str | None) -> list:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if secret:
        token = base64.b64encode(secret.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_version_completion_and_usage_errors(capsys):
    from calypso import __version__

    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out == f"calypso {__version__}\n"
    code, out, err = calypso(capsys, "completion", "bash")
    assert code == 0 and "complete " in out and "calypso" in out
    # Usage errors: argparse's usage and message as usual, or JSON when --json was asked.
    code, out, err = calypso(capsys, "run", "nonsense", "x")
    assert code == 2 and err.startswith("usage: calypso run") and "invalid choice" in err
    code, out, err = calypso(capsys, "run", "nonsense", "x", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and error["type"] == "UsageError" and "invalid choice" in error["message"]


def test_an_error_is_one_line_or_json_for_the_scripts_that_asked(tmp_path, capsys):
    code, out, err = calypso(capsys, "run", "diffraction", tmp_path / "no")
    assert code == 3 and out == ""
    assert err == f"calypso: error: {tmp_path / 'no'} does not exist\n"
    # Under --json the same error is JSON on standard output, standard error quiet.
    code, out, err = calypso(capsys, "run", "diffraction", tmp_path / "no", "--json")
    assert code == 3 and err == ""
    assert json.loads(out)["error"] == {
        "type": "RawDataError",
        "message": f"{tmp_path / 'no'} does not exist",
        "exit_code": 3,
    }


def test_a_beamline_rule_naming_no_technique_or_parameter_stops_the_watcher(
    tmp_path, monkeypatch, capsys
):
    # Once each dataset the rule matched was rejected in turn, said only in the log.
    rules = {
        "id11": [
            {"technique": "difraction", "detector": "eiger*"},
            {"technique": "diffraction", "parameters": {"npts": 1000}},
            {"technique": "flow:my-look"},  # a saved flow: looked up as it runs
        ]
    }
    monkeypatch.setenv("CALYPSO_WATCH__BEAMLINES", json.dumps(rules))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # refused before it is needed
    code, out, err = calypso(capsys, "watch", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "watch.beamlines.id11[0].technique 'difraction' is no technique (did you mean " in err
    assert "'diffraction'?" in err
    assert "watch.beamlines.id11[1].parameters: unknown diffraction parameter 'npts' (did " in err
    assert "[2]" not in err


def test_sample_data_command(tmp_path, capsys):
    status, out, _ = calypso(capsys, "sample-data", "diffraction", tmp_path, "--frames", "3")
    assert status == 0 and "calypso run diffraction" in out
    [bliss_file] = tmp_path.rglob("RAW_DATA/CeO2/CeO2_0001/CeO2_0001.h5")
    with h5py.File(bliss_file) as h5:
        assert h5["1.1/measurement/pilatus1m"].shape == (3, 1043, 981)
        assert h5["1.1/instrument/pilatus1m/data"].is_virtual
        lima = h5["1.1/instrument/pilatus1m/data"].virtual_sources()[0].file_name
    with h5py.File(bliss_file.parent / lima) as h5:
        assert "32008" in h5["/entry_0000/measurement/data"]._filters  # bitshuffle-LZ4


def test_sample_data_writes_a_map_starting_off_the_sample(tmp_path, capsys):
    """``--off-sample N``: the map's first N positions have no edge (air); the others are
    the numbers of the same map without them."""
    for folder, extra in (("on", ()), ("off", ("--off-sample", "5"))):
        status, _, _ = calypso(
            capsys, "sample-data", "spectroscopy", tmp_path / folder, "--spectra", "30", *extra
        )
        assert status == 0
    files = [next((tmp_path / f).rglob("Fe_map_0001.h5")) for f in ("on", "off")]
    with h5py.File(files[0]) as on, h5py.File(files[1]) as off:
        i0, it = off["1.1/measurement/i0"][()], off["1.1/measurement/it"][()]
        assert np.array_equal(it[5:], on["1.1/measurement/it"][5:])
        transmission = it[:5] / i0[:5]  # air: flat, 0.9 but for counting noise
        assert np.allclose(transmission, 0.9, atol=0.01)
    status, _, err = calypso(
        capsys, "sample-data", "spectroscopy", tmp_path / "bad", "--spectra", "3",
        "--off-sample", "4",
    )  # fmt: skip
    assert status == 2 and "--off-sample 0 to --spectra" in err
    # A map wholly off the sample: refused before anything runs, saying so.
    calypso(capsys, "sample-data", "spectroscopy", tmp_path / "air", "--spectra", "80",
            "--off-sample", "80")  # fmt: skip
    [raw] = {p.parent for p in (tmp_path / "air").rglob("Fe_map_0001.h5")}
    status, _, err = calypso(capsys, "run", "spectroscopy", raw, "--local")
    assert status == 3, err
    assert "no absorption edge" in err and "63 other spectra spread over the map" in err, err


@pytest.mark.parametrize(
    ("arguments", "status"),
    [(["parameters", "spectroscopy"], 0), (["run", "spectroscopy", "/no/such/file.xdi"], 3)],
    ids=["done", "refused"],
)
def test_the_command_ends_at_once_with_what_an_exit_owes_done(arguments, status, tmp_path):
    """`calypso` ends its process without tearing its modules down (~0.5 s), but only once
    Python's own exit work is done: its status, its threads joined, its `atexit` handlers
    run (Prefect's workers drain there), its output flushed."""
    script = (  # a thread that finishes its work only once the command's main has returned
        "import atexit, sys, threading, time\n"
        "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
        "def later():\n"
        "    while threading.main_thread().is_alive():\n"
        "        time.sleep(0.01)\n"
        "    time.sleep(0.2)\n"
        "    print('thread done')\n"
        "threading.Thread(target=later).start()\n"
        "from calypso.flows.cli.__main__ import *\n"
    )
    env = {**os.environ, "CALYPSO_HOME": str(tmp_path / "home")}
    ran = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ran.returncode == status, ran.stderr
    assert ran.stderr.rstrip().endswith("atexit ran"), ran.stderr
    assert ran.stdout.rstrip().endswith("thread done"), ran.stdout[-500:]


def test_a_home_keeps_two_clusters_at_most_the_least_used_idle_one_stops(tmp_path):
    """Commands from several folders, or of several techniques, kept a cluster each (two
    worker processes apiece) for their idle ten minutes: five on a user's two-core
    machine. A third stops the one used least recently that no command holds."""
    from calypso.executors import kept
    from calypso.executors.dask import local_cluster_options
    from calypso.settings import ExecutorSettings

    home = tmp_path / "home"
    options = local_cluster_options(ExecutorSettings(n_workers=1))
    api = (os.environ["PREFECT_API_URL"], os.environ.get("PREFECT_API_AUTH_STRING"))
    pids = {}
    try:
        for key in ("first", "second", "third"):
            if key == "third":  # the first is in use again, by a living command
                held = _hold(home / "clusters" / "first.use")
            kept.kept_cluster(home, key, options, 600, api)
            kept._held.pop().close()  # as the command that started it exits
            pids[key] = kept.read_address(home / "clusters" / f"{key}.json")["pid"]
            time.sleep(1.1)  # one second less idle than the one before
        # The second, idle and least recently used (the first is held), has gone.
        assert _gone(pids["second"], 30)
        assert {c["key"] for c in kept.kept_clusters(home)} == {"first", "third"}
        held.close()
    finally:
        for pid in pids.values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    assert all(_gone(pid, 30) for pid in pids.values())


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_ctrl_c_stays_a_ctrl_c_once_dask_jobqueue_is_imported():
    """dask-jobqueue sets a Ctrl-C handler of its own (``sys.exit()``) as it is imported: a
    Ctrl-C then ended a command that runs on SLURM with exit status 0 and not a word, and
    bypassed serve's stop request. A fresh interpreter: the module is imported once."""
    code = (
        "import signal\n"
        "from calypso.executors.slurm import slurm_cluster_class\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "slurm_cluster_class()\n"
        "print(signal.getsignal(signal.SIGINT) is before)\n"
    )
    seen = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert seen.stdout.strip() == "True"


def test_a_ctrl_c_that_a_library_wrapped_is_one_line_not_a_traceback(monkeypatch, capsys):
    # Pressed as a command imported Prefect, pydantic's core wrapped it in a SchemaError
    # ("... KeyboardInterrupt: "): a traceback. Other errors stay a bug's traceback.
    import argparse
    import io

    from calypso.flows import cli

    def wrapped_by_pydantic(_args):
        raise RuntimeError('Error building "literal" validator:\n  KeyboardInterrupt: ')

    def raised_handling_it(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("cannot rollback - no transaction is active") from None

    def a_bug(_args):
        raise ValueError("a bug")

    for handler in (wrapped_by_pydantic, raised_handling_it, a_bug):
        parser = argparse.ArgumentParser()
        parser.set_defaults(handler=handler)
        monkeypatch.setattr(cli, "build_parser", lambda groups, parser=parser: parser)
        if handler is a_bug:
            with pytest.raises(ValueError):
                cli.main([])
            continue
        assert cli.main([]) == 130
        assert capsys.readouterr().err.strip() == "calypso: error: interrupted"

    def a_pager_that_quit(_args):
        raise BrokenPipeError  # an Exception too: still the quiet exit, not a traceback

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=a_pager_that_quit)
    monkeypatch.setattr(cli, "build_parser", lambda groups: parser)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert cli.main([]) == 0
