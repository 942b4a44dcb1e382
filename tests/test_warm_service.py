"""Runs submitted to a running `calypso serve` (issue #18): the command and the service as
real processes, the service's Dask workers kept warm, the submitter known by the kernel.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.samples.diffraction import write_diffraction_sample
from tests.processes import start, stop, wait_until

pytestmark = pytest.mark.slow


def integrated(summary: dict) -> np.ndarray:
    """The patterns: the signal of the run's first NXdata."""
    path, group = summary["outputs"][0].split("::")
    with h5py.File(path, "r") as h5:
        return h5[group][h5[group].attrs["signal"]][()]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A data root with one proposal's diffraction dataset, and `calypso serve` on it with
    its submission socket in a short, world-traversable folder (a Unix socket's path is
    limited to 107 bytes; pytest's folders are private to their owner)."""
    work = tmp_path_factory.mktemp("warm")
    sample = write_diffraction_sample(work / "data", frames=8, frames_per_file=4)
    sockets = Path(tempfile.mkdtemp(prefix="calypso-"))
    sockets.chmod(0o755)
    env = dict(os.environ)
    env.update(
        CALYPSO_HOME=str(work / "home"),
        CALYPSO_DATA_ROOTS=json.dumps([str(work / "data")]),
        CALYPSO_SERVE__SOCKET=str(sockets / "serve.sock"),
        CALYPSO_EXECUTOR__N_WORKERS="1",
    )
    env.pop("CALYPSO_CATALOGUE__PATH", None)
    log = work / "serve.log"
    served = start(["serve", "--technique", "diffraction"], env, log)

    def listening() -> bool:
        assert served.poll() is None, log.read_text()[-3000:]
        return "runs can be submitted" in log.read_text()

    wait_until(listening, 180, "calypso serve's submission socket")
    yield sample, env, sockets / "serve.sock", served, log
    stop(served)
    shutil.rmtree(sockets, ignore_errors=True)


def calypso_run(env, *arguments, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "calypso.flows.cli", "run", "diffraction", *arguments, "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_service_confines_a_submitted_run_to_the_submitters_proposals(service):
    sample, env, sock, _, log = service
    poni, mask = (str(sample.calibration[name]) for name in ("poni", "mask"))
    base = [str(sample.raw_dataset_dir), "--set", f"poni={poni}", "--set", f"mask={mask}"]

    # Bad parameters: the service's error, its kind and exit status, as if run here.
    bad = calypso_run(env, *base, "--set", "npt=-3")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert json.loads(bad.stdout)["error"]["type"] == "ParameterError"

    # An output outside the proposal: refused before anything is written.
    elsewhere = sample.raw_dataset_dir.parents[5] / "elsewhere"
    refused = calypso_run(env, *base, "--output", str(elsewhere))
    assert refused.returncode == 7, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)["error"]
    assert error["type"] == "AccessError" and "outside proposal" in error["message"]
    # Said to come from the service, with the way to run it here instead.
    assert "said by `calypso serve`" in error["message"] and "--local" in error["message"]
    assert not elsewhere.exists()

    # Another account, as the kernel tells the service: not in the proposal, refused.
    if os.getuid() != 0:
        return  # only root can be someone else
    nobody = pwd.getpwnam("nobody")
    accepted, reply = replies_as(nobody, sock, submission(sample, {"poni": poni, "mask": mask}))
    assert accepted == {"accepted": True}
    assert reply["error"]["type"] == "AccessError" and reply["error"]["exit_code"] == 7
    assert f"run submitted by uid {nobody.pw_uid}" in log.read_text()


def test_a_run_sent_to_the_service_is_the_run_done_alone(service):
    sample, env, sock, served, log = service
    scripts = sample.calibration["poni"].parent
    # Relative files mean the command's folder, not the service's.
    arguments = [str(sample.raw_dataset_dir), "--set", "npt=300", "--set", "monitor=mon"]
    arguments += ["--set", f"poni={sample.calibration['poni'].name}"]
    arguments += ["--set", f"mask={sample.calibration['mask'].name}"]
    first = calypso_run({**env, "PYTHONPROFILEIMPORTTIME": "1"}, *arguments, cwd=scripts)
    assert first.returncode == 0, first.stdout + first.stderr + log.read_text()[-3000:]
    by_service = json.loads(first.stdout)
    assert by_service["service"] == str(sock)
    # Handed over before the command reads settings of its own (the service's decide).
    imported = {line.split("|")[-1].strip() for line in first.stderr.splitlines()}
    assert "calypso.flows.online.submissions" in imported
    assert "pydantic_settings" not in imported
    assert by_service["count"] == 8
    assert f"run submitted by uid {os.getuid()}: diffraction" in log.read_text()

    # The same run again, through the socket as any client speaks to it: the stages and
    # progress come first, counting up to every frame, then the summary.
    files = {name: str(path) for name, path in sample.calibration.items()}
    answers = replies(sock, submission(sample, {"npt": 300, "monitor": "mon", **files}))
    kinds = [next(iter(reply)) for reply in answers]
    assert kinds[0] == "accepted" and kinds[-1] == "summary"  # acknowledged at once
    assert "stage" in kinds and "error" not in kinds
    progress = [reply["progress"] for reply in answers if "progress" in reply]
    assert progress[-1] == [8, 8] and [done for done, _ in progress] == sorted(
        done for done, _ in progress
    )
    np.testing.assert_array_equal(integrated(answers[-1]["summary"]), integrated(by_service))

    # A service killed leaves its socket behind: the command then runs alone, and gets
    # the same patterns.
    stop(served, signal.SIGKILL)
    assert sock.exists()
    alone = calypso_run(env, *arguments, cwd=scripts)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    by_itself = json.loads(alone.stdout)
    assert "service" not in by_itself
    np.testing.assert_array_equal(integrated(by_itself), integrated(by_service))


def submission(sample, values: dict) -> dict:
    """A request as `calypso run` sends it."""
    return {
        "technique": "diffraction",
        "input": str(sample.raw_dataset_dir),
        "values": values,
        "scans": None,
        "output": None,
        "export_to": None,
        "cwd": "/",
        "source": "",
    }


def replies(sock: Path, request: dict) -> list[dict]:
    """What the service answers to ``request``, line by line."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(sock))
        connection.sendall(json.dumps(request).encode() + b"\n")
        return [json.loads(line) for line in connection.makefile("rb")]


def replies_as(account: pwd.struct_passwd, sock: Path, request: dict) -> list[dict]:
    """:func:`replies` to a process of ``account`` (forked, then no longer root: Calypso's
    interpreter is not one that account may start)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: answers through the pipe, then goes
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            os.write(write, json.dumps(replies(sock, request)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        text = answer.read()
    os.waitpid(child, 0)
    return json.loads(text)


PLAIN_PYTHON = "/usr/bin/python3"  # the tests' own is under root's home, 0700


def test_a_command_sends_nothing_to_a_socket_another_account_listens_on():
    """In a folder anyone can write, another account can listen where the service's
    socket is named: the command refuses to send it the run (paths, parameters)."""
    from calypso.errors import ConfigurationError
    from calypso.flows.online.submissions import connect

    if os.geteuid() != 0:
        pytest.skip("listening as another account needs root (CI runs as root)")
    if not Path(PLAIN_PYTHON).exists():
        pytest.skip(f"{PLAIN_PYTHON} (a Python another account may run) is missing")
    shared = Path(tempfile.mkdtemp(prefix="calypso-shared-", dir="/tmp"))  # reachable by all
    shared.chmod(0o1777)  # like /tmp itself
    path = shared / "serve.sock"
    listener = (
        "import os, socket, sys, time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('listening', flush=True); time.sleep(60)\n"
    )
    impostor = subprocess.Popen(
        [PLAIN_PYTHON, "-c", listener, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert impostor.stdout.readline().strip() == "listening"
        with pytest.raises(ConfigurationError, match="is served by uid 65534"):
            connect(path)
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("when", ["starting", "started"])
def test_ctrl_c_stops_the_service_with_one_line_and_no_traceback(tmp_path, when):
    # A terminal sends Ctrl-C to every process of the group: each Dask worker and the fork
    # server printed a traceback (mid-import while serve started), burying serve's line.
    # Started, it has a run in flight, which the Ctrl-C reaches too: the run records
    # itself interrupted (cancelled by serve's runner first, its record stayed "running").
    from calypso.registry.catalogue import SQLiteCatalogue

    env = dict(os.environ)
    env.update(
        CALYPSO_HOME=str(tmp_path / "home"),
        CALYPSO_DATA_ROOTS=json.dumps([str(tmp_path)]),
        CALYPSO_SERVE__SOCKET=str(tmp_path / "serve.sock"),
        CALYPSO_EXECUTOR__N_WORKERS="1",
    )
    env.pop("CALYPSO_CATALOGUE__PATH", None)
    technique = "spectroscopy" if when == "starting" else "diffraction"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        served = subprocess.Popen(
            [sys.executable, "-m", "calypso.flows.cli", "serve", "--technique", technique],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # as at a terminal: pytest-xdist's workers ignore SIGINT, which children inherit
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        # Its workers are up once it listens; the fork server is importing then.
        sign = "runs can be submitted" if when == "starting" else "fork server for served runs"
        wait_until(lambda: sign in log.read_text(), 180, f"serve {when}")
        if when == "started":
            run = _a_run_in_flight(tmp_path)
        os.killpg(served.pid, signal.SIGINT)
        try:
            served.wait(timeout=60)
        except subprocess.TimeoutExpired:
            output = log.read_text()
            raise AssertionError(f"serve still runs 60 s after Ctrl-C:\n{output}") from None
        assert served.returncode == 0, log.read_text()[-3000:]
    finally:
        stop(served)
    output = log.read_text()
    assert "interrupted: serve stops" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    if when == "started":
        [record] = SQLiteCatalogue(tmp_path / "home" / "catalogue.sqlite").list()
        assert record.status == "failed" and record.message.startswith("interrupted"), record
        assert _flow_run_state(run) == "Crashed"  # as Prefect says a run stopped by Ctrl-C


def _a_run_in_flight(tmp_path: Path):
    """A diffraction run of serve's deployment, once it integrates."""
    from prefect.deployments import run_deployment

    sample = write_diffraction_sample(tmp_path / "visitor", frames=480, frames_per_file=40)
    parameters = {
        "raw": str(sample.raw_dataset_dir),
        "parameters": {**{k: str(v) for k, v in sample.calibration.items()}, "chunk_size": 4},
    }
    run = run_deployment("diffraction/diffraction", parameters=parameters, timeout=0)
    output = sample.dataset.processed_dataset_dir("diffraction")
    wait_until(lambda: list(output.glob(".calypso-partial-*")), 120, "the run", 0.02)
    assert _flow_run_state(run) == "Running", "the run ended before it could be stopped"
    return run


def _flow_run_state(run) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run.id).state.name


def test_a_stop_asked_is_taken_where_the_command_is_ready_and_twice_at_once():
    # Raised wherever serve's main thread was, a Ctrl-C ended inside a SQLite transaction
    # (exit 5), inside pydantic's schema building (a traceback) or was absorbed by
    # Prefect's starting runner (serve went on).
    import time

    from calypso.executors.interrupts import StopRequest

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist ignores it
    try:
        with StopRequest() as stop:
            stop.check()  # nothing asked: goes on
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python acts on a signal between two instructions
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                stop.check()
            with pytest.raises(KeyboardInterrupt):  # asked again: at once
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stop_asked_wakes_a_waiting_loop_whichever_thread_took_the_signal():
    # The signal reached one of Prefect's threads: a Python handler alone ran only when
    # serve's loop next woke (a poll away).
    import asyncio
    import threading
    import time

    from calypso.executors.interrupts import StopRequest

    sent = []

    def take_the_signal() -> None:  # once the loop waits
        time.sleep(0.5)
        sent.append(time.monotonic())
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    async def wait_for_stop(stop: StopRequest) -> float:
        asked = asyncio.Event()
        with stop.in_loop(asyncio.get_running_loop(), asked.set):
            threading.Thread(target=take_the_signal, daemon=True).start()
            await asyncio.wait_for(asked.wait(), timeout=30)
            return time.monotonic() - sent[0]

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist ignores it
    try:
        with StopRequest() as stop:
            assert asyncio.run(wait_for_stop(stop)) < 2
            assert stop.requested
            with StopRequest() as before:  # asked before the loop: acted on as it starts
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                assert asyncio.run(wait_for_stop_asked_before(before)) is True
    finally:
        signal.signal(signal.SIGINT, previous)


async def wait_for_stop_asked_before(stop) -> bool:
    import asyncio

    asked = asyncio.Event()
    with stop.in_loop(asyncio.get_running_loop(), asked.set):
        await asyncio.wait_for(asked.wait(), timeout=5)
    return asked.is_set()
