"""Prefect and Dask closed (issue #20 item 2, docs/security.md): the Prefect API and UI
that ``calypso server`` starts ask for its secret; Calypso's Dask clusters talk TLS with
Calypso's certificate and refuse a process without it; nothing listens beyond loopback
unless configured.

The Prefect server is the session's (tests/conftest.py starts it with ``calypso server``,
in a fresh Calypso home); the Dask clusters are started here, as Calypso starts them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask
import pytest
import yaml

from calypso.errors import ConfigurationError
from calypso.executors.dask import build_task_runner, local_cluster_options, start_local_cluster
from calypso.executors.tls import calypso_security, certificate_path, new_certificate
from calypso.flows.runtime import check_prefect_api, prefect_auth_path, prefect_auth_string
from calypso.private_files import create_private_file, read_private_file
from calypso.settings import ExecutorSettings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> tuple[str, str]:
    """The session's Prefect server (``calypso server``) and the secret it asks for."""
    path = prefect_auth_path(load_settings())
    if not path.is_file():
        pytest.skip("PREFECT_API_URL names a server this session did not start")
    return os.environ["PREFECT_API_URL"], prefect_auth_string(load_settings())


def status(url: str, secret: str | None = None, body: object = None) -> int:
    """The HTTP status of a request, with ``secret`` as Prefect's clients send it."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if secret is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(secret.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_prefect_api_and_ui_refuse_requests_without_the_secret(server):
    api, secret = server
    path = prefect_auth_path(load_settings())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wrong = secret[:-1] + ("x" if secret[-1] != "x" else "y")
    # Reading runs, starting a deployment's run, posting an acquisition: refused ...
    for method_path, body in [
        ("/flow_runs/filter", {}),
        ("/deployments/filter", {}),
        ("/events", []),
        ("/admin/version", None),
    ]:
        assert status(api + method_path, body=body) == 401, method_path
        assert status(api + method_path, wrong, body) == 401, method_path
    # ... unless the secret comes with them.
    assert status(api + "/flow_runs/filter", secret, {}) == 200
    assert status(api + "/events", secret, []) == 204
    # The UI asks for the secret (its login page) before it shows anything.
    ui = api.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as response:
        assert json.load(response)["auth"] == "BASIC"
    # Only the health check answers anyone (a load balancer's probe).
    assert status(api + "/health") == 200
    # The secret is never in the server's log.
    log = Path(os.environ["CALYPSO_HOME"]).parent / "prefect-server.log"
    assert log.is_file() and secret.split(":", 1)[1] not in log.read_text(errors="replace")


def test_commands_present_the_secret_calypso_server_keeps_in_their_home(server):
    """A command pointed at `calypso server` (PREFECT_API_URL) with no secret given finds
    the one the server keeps in the same home (it was read after Prefect had read its
    settings: 401 Unauthorized, a traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_AUTH_STRING"}
    ran = subprocess.run(
        [sys.executable, "-m", "calypso.flows.cli", "automations", "install", "--block",
         "custom-webhook/absent"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-3000:]
    assert ran.stderr.startswith("calypso: error: the Prefect server has no block")


def test_the_event_stream_refuses_a_websocket_without_the_secret(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    api, secret = server
    stream = api.replace("http://", "ws://", 1) + "/events/out"

    def answer(token: str) -> object:
        with connect(stream, subprotocols=["prefect"], open_timeout=10) as websocket:
            websocket.send(json.dumps({"type": "auth", "token": token}))
            try:
                return json.loads(websocket.recv(timeout=10))
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert answer("calypso:wrong") == 1008  # policy violation
    assert answer(secret) == {"type": "auth_success"}


@pytest.mark.usefixtures("server")
def test_calypso_commands_present_the_secret_of_their_home(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_AUTH_STRING"}
    env.update(
        CALYPSO_DATA_ROOTS=json.dumps([str(tmp_path)]),
        CALYPSO_WATCH__BEAMLINES=json.dumps({"*": [{"technique": "diffraction"}]}),
        CALYPSO_WATCH__STATE_PATH=str(tmp_path / "watch.sqlite"),
        CALYPSO_CATALOGUE__PATH=str(tmp_path / "catalogue.sqlite"),
    )
    # `calypso watch` checks the API with an authenticated request before its first pass:
    # it found the secret in Calypso's home (the one the server keeps), without being told.
    watch = [sys.executable, "-m", "calypso.flows.cli", "watch", str(tmp_path), "--once"]
    done = subprocess.run(watch, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"looked once at {tmp_path}: 0 acquisition(s) announced" in done.stderr
    # A wrong secret is a one-line error, and the secret given is not echoed.
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "calypso:not-the-secret")
    with pytest.raises(ConfigurationError, match="refused this process's credentials") as error:
        check_prefect_api()
    assert "not-the-secret" not in str(error.value) and "\n" not in str(error.value)


TEMPORARY_SERVER = """
import os, urllib.error, urllib.request
from calypso.flows.prefect_api import prefect_api
from calypso.flows.runtime import prefect_auth_headers

def status(url, headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code

with prefect_api() as api:
    version = api + "/admin/version"
    print(status(version, {}), status(version, prefect_auth_headers()))
print("PREFECT_API_AUTH_STRING" in os.environ)
"""


def test_the_temporary_prefect_server_of_a_run_is_closed_too(tmp_path):
    """No server configured and none kept (``server.local_keep_s = 0``): `calypso run`
    starts Prefect's temporary one on a loopback port, with a secret of its own for as
    long as it lives."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["CALYPSO_SERVER__LOCAL_KEEP_S"] = "0"  # one temporary server, not the kept local one
    done = subprocess.run(
        [sys.executable, "-c", TEMPORARY_SERVER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["401", "200", "False"]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster as Calypso starts one (``calypso run``, ``calypso serve``)."""
    cluster = start_local_cluster(**local_cluster_options(ExecutorSettings(n_workers=1)))
    yield cluster
    cluster.close()


def public_certificate(path: Path) -> str:
    """The certificate in Calypso's file, without its key: what anyone may have seen."""
    text = path.read_text()
    return text[text.index("-----BEGIN CERTIFICATE-----") :]


def foreign_security(trusting: Path):
    """What a process without Calypso's key can do at best: trust Calypso's certificate
    and present one of its own."""
    from distributed import Security

    own = new_certificate().decode()
    options = {
        f"tls_{role}_{part}": own for role in ("client", "worker") for part in ("cert", "key")
    }
    return Security(require_encryption=True, tls_ca_file=public_certificate(trusting), **options)


def closed_on(connect) -> bool:
    """Whether the scheduler hangs up on what ``connect()`` sends (a timeout would mean it
    waits for more: it took the peer)."""
    try:
        with connect() as peer:
            peer.sendall(b"\0" * 64)
            return peer.recv(64) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_a_dask_cluster_serves_only_processes_with_the_certificate(cluster):
    from distributed import Client, Worker

    certificate = certificate_path(load_settings().home)
    assert stat.S_IMODE(certificate.stat().st_mode) == 0o600
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    ours = calypso_security()

    # A client or a worker with a certificate of its own is refused by the scheduler ...
    foreign = foreign_security(certificate)
    with pytest.raises(OSError, match="TLS"):
        Client(cluster.scheduler_address, security=foreign, timeout=3)

    async def join(security) -> None:
        async with Worker(
            cluster.scheduler_address, security=security, nthreads=1, death_timeout=5
        ):
            pass

    with pytest.raises(TimeoutError, match="Worker start timed out"):
        asyncio.run(join(foreign))
    asyncio.run(join(ours))  # the same worker with Calypso's certificate joins (and leaves)

    # ... and so is a TLS peer without any certificate, or one that speaks plain TCP.
    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=public_certificate(certificate))
    context.check_hostname = False

    def tls_without_certificate():
        return context.wrap_socket(socket.create_connection((host, int(port)), timeout=10))

    assert closed_on(tls_without_certificate)
    assert closed_on(lambda: socket.create_connection((host, int(port)), timeout=10))

    # With the certificate, work is done.
    with Client(cluster.scheduler_address, security=ours, timeout=30) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6


def test_the_dashboard_and_the_scheduler_listen_on_loopback_only(cluster):
    import psutil

    dashboard = int(cluster.dashboard_link.split(":")[2].split("/")[0])
    scheduler = int(cluster.scheduler_address.rsplit(":", 1)[1])
    listening = {
        c.laddr.port: c.laddr.ip
        for c in psutil.Process().net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening[dashboard] == "127.0.0.1" and listening[scheduler] == "127.0.0.1"


def test_a_commands_cluster_of_threads_takes_no_port():
    """A command's own cluster of threads (diffraction's ``threaded_chunks``) is scheduler,
    worker and client in one process: they talk in memory, where nothing else can reach
    them, with or without a certificate; only the dashboards listen, on loopback."""
    import psutil
    from distributed import Client

    def listening() -> set[tuple[str, int]]:
        connections = psutil.Process().net_connections("inet")
        return {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}

    before = listening()
    cluster = start_local_cluster(**local_cluster_options(ExecutorSettings(n_workers=2), True))
    try:
        (worker,) = cluster.workers.values()
        assert worker.state.nthreads == 2
        comms = [cluster.scheduler.address, worker.address]
        assert all(address.startswith("inproc://") for address in comms)
        opened = listening() - before
        assert {ip for ip, _ in opened} == {"127.0.0.1"}
        dashboards = {cluster.scheduler.http_server.port, worker.http_server.port}
        assert {port for _, port in opened} == dashboards
        with Client(cluster.scheduler_address, timeout=30) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    finally:
        cluster.close()


def test_a_scheduler_address_without_tls_is_refused_with_a_message():
    executor = ExecutorSettings(kind="address", address="tcp://scheduler.example.org:8786")
    with pytest.raises(ConfigurationError, match="not tls://.*CALYPSO_EXECUTOR__TLS=false"):
        build_task_runner(executor)
    build_task_runner(executor.model_copy(update={"tls": False}))  # the way out, on purpose


def test_a_scheduler_that_does_not_answer_is_named_in_one_line(
    diffraction_sample, tmp_path, catalogue_path
):
    """A scheduler named by address that is down: Dask's client tried for 30 s and ended
    the command in a 111-line traceback, exit 1 (a helper's walk of the operations
    docs). Now one line, exit 2, before a record or a folder is made."""
    from calypso.executors.dask import require_scheduler

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    executor = ExecutorSettings(kind="address", address=f"tls://127.0.0.1:{port}")
    with pytest.raises(ConfigurationError, match=f"at tls://127.0.0.1:{port} .* does not answer"):
        require_scheduler(executor)
    result = subprocess.run(
        [sys.executable, "-m", "calypso.flows.cli", "run", "diffraction",
         str(diffraction_sample.raw_dataset_dir), "--output", str(tmp_path / "out"),
         "--set", f"poni={diffraction_sample.calibration['poni']}"],
        capture_output=True, text=True, timeout=120,
        env=os.environ | {
            "CALYPSO_CATALOGUE__PATH": str(catalogue_path), "CALYPSO_EXECUTOR__KIND": "address",
            "CALYPSO_EXECUTOR__ADDRESS": executor.address,
        },
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "does not answer" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_slurm_controller_that_does_not_answer_is_named():
    """kind = "slurm" with slurmctld down: dask-jobqueue tried sbatch every ten seconds,
    for good, and `calypso run` said nothing (a helper's walk of the operations docs). The
    run is refused in one line exactly when the controller does not answer its ping (down
    here unless tests/test_slurm.py started it)."""
    from calypso.executors.dask import require_scheduler

    if shutil.which("scontrol") is None:
        pytest.skip("no SLURM client on this machine")
    executor = ExecutorSettings(kind="slurm", slurm={"queue": "q"})
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode == 0:
        require_scheduler(executor)
    else:
        with pytest.raises(ConfigurationError, match=r"SLURM controller does not answer"):
            require_scheduler(executor)


def test_slurm_jobs_get_the_certificate_by_path(tmp_path):
    from calypso.executors.slurm import slurm_cluster_options, start_slurm_cluster

    pytest.importorskip("dask_jobqueue")
    options, _ = slurm_cluster_options(ExecutorSettings(kind="slurm", slurm={"queue": "q"}))
    assert options["protocol"] == "tls://"
    assert options["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")
    cluster = start_slurm_cluster(**options | {"log_directory": str(tmp_path)})
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
    finally:
        cluster.close()
    certificate = str(certificate_path(load_settings().home))
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert f"{flag} {certificate}" in script
    assert "PRIVATE KEY" not in script  # a path, never the key, in the job script


@pytest.fixture
def dask_config_restored():
    """dask-cloudprovider writes the cluster's TLS into this process's Dask configuration."""
    import copy

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_an_openstack_cluster_has_a_certificate_of_its_own(dask_config_restored):
    pytest.importorskip("dask_cloudprovider.openstack")
    from calypso.executors.openstack import (
        certificate_file,
        make_cluster,
        running_cluster_security,
    )

    openstack = {
        "auth_url": "https://keystone.example.org:5000/v3",
        "application_credential_id": "id",
        "application_credential_secret": "app-secret",
        "network_id": "net",
    }
    settings = load_settings(executor={"kind": "openstack", "openstack": openstack})

    async def build():
        return make_cluster(settings, [], asynchronous=True)

    cluster = asyncio.run(build())
    path = certificate_file(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cluster.protocol == "tls" and cluster.security.require_encryption
    # The VMs get it inline (their only channel); the clients read the file.
    assert cluster.security.tls_worker_cert == path.read_text()
    assert running_cluster_security(settings).tls_client_cert == str(path)
    assert path.read_text() != certificate_path(settings.home).read_text()
    assert cluster.scheduler_options["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"


def test_secret_files_are_private_and_made_once(tmp_path):
    path = tmp_path / "home" / "secret"
    assert create_private_file(path, b"first") is True
    assert create_private_file(path, b"second") is False  # another process was first
    assert read_private_file(path) == b"first"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        read_private_file(path)


def test_the_compose_pilot_publishes_on_loopback_only():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("${PUBLISH:-127.0.0.1}:") for p in published)
    assert "ports" not in services["dask-scheduler"] or all(
        "8786" not in p for p in services["dask-scheduler"]["ports"]
    )
    assert services["prefect-server"]["command"][0] == "server"  # `calypso server`: closed
    assert services["calypso-init"]["command"] == ["server", "--init"]
    for name in ("dask-scheduler", "dask-worker"):
        assert "--tls-key=/var/lib/calypso/tls/dask.pem" in services[name]["command"]


def test_server_init_makes_both_secrets_and_prints_neither(tmp_path, monkeypatch, capsys):
    from calypso.flows.cli import main

    monkeypatch.setenv("CALYPSO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    assert main(["server", "--init"]) == 0
    out = capsys.readouterr().out
    secret, certificate = tmp_path / "home" / "prefect-auth", tmp_path / "home" / "tls" / "dask.pem"
    for path in (secret, certificate):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and str(path) in out
    made = secret.read_text(), certificate.read_text()
    assert made[0].strip().split(":", 1)[1] not in out and "PRIVATE" not in out
    assert main(["server", "--init"]) == 0  # again: the same secrets, kept
    assert (secret.read_text(), certificate.read_text()) == made


def test_calypso_server_outlives_the_shell_that_started_it(tmp_path, loopback):
    """An operator's `calypso server &` stopped a few seconds after its shell exited (the
    watch for an orphaned server, meant for the servers Calypso's commands start), and the
    portal then found no Prefect server."""
    import psutil

    port = loopback.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["CALYPSO_HOME"] = str(tmp_path / "home")
    log = tmp_path / "server.log"
    shell = subprocess.run(
        ["bash", "-c", f'"$0" -m calypso.flows.cli server --port {port} >"$1" 2>&1 & echo $!; '
         "sleep 3", sys.executable, str(log)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    server = psutil.Process(int(shell.stdout.split()[0]))  # the shell has gone by now
    try:
        loopback.wait_for_http(f"http://127.0.0.1:{port}/api/health", 120)
        time.sleep(4)  # the orphan watch looked every second
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE, log.read_text()
        loopback.wait_for_http(f"http://127.0.0.1:{port}/api/health", 10)
    finally:
        server.terminate()
        server.wait(30)
