"""The deployment files are checked with what runs here (no Docker engine, no OpenStack):
YAML structure, Prefect's own trigger model, the flows the entrypoints name, and the
shell scripts' syntax. `docker compose config` is used where the client has compose."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from calypso.flows.techniques import TECHNIQUES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent


def test_prefect_yaml_has_one_triggered_deployment_per_technique():
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint

    from calypso.flows.online.live_base import LIVE_TECHNIQUES

    config = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    live = {f"{name}-live": name for name in LIVE_TECHNIQUES}
    assert set(deployments) == {*TECHNIQUES, *live, "saved-flow"}
    for name, deployment in deployments.items():
        path, function = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        flow = getattr(import_module(f"calypso.{path[:-3].replace('/', '.')}"), function)
        assert flow.name == name
        if name in live:  # made on first use: loaded by its path, as `prefect deploy` does
            assert load_flow_from_entrypoint(str(REPO / deployment["entrypoint"])).name == name
        [trigger] = deployment["triggers"]
        model = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
        expected = (
            "calypso.acquisition.started" if name in live else "calypso.acquisition.completed"
        )
        assert model.expect == {expected}
        assert model.match.model_dump() == {"calypso.technique": live.get(name, name)}
        if name == "saved-flow":
            assert "name" in trigger["parameters"]
        if name in live:  # the scan followed, where
            assert {"source", "scan_key", "trigger"} <= set(trigger["parameters"])
        # Every parameter the trigger fills is one of the flow's.
        assert set(trigger["parameters"]) <= set(inspect.signature(flow.fn).parameters)
        assert deployment["work_pool"]["name"] == "calypso"
        assert deployment["concurrency_limit"] >= 1


def test_compose_pilot_wires_server_database_serve_watch_and_dask():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "dask-scheduler", "dask-worker"} <= set(services)
    assert {"calypso-serve", "calypso-watch", "calypso-portal"} <= set(services)
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    serve = services["calypso-serve"]
    assert serve["command"] == ["serve"]
    assert serve["environment"]["CALYPSO_EXECUTOR__KIND"] == "address"
    assert serve["environment"]["CALYPSO_EXECUTOR__ADDRESS"] == "tls://dask-scheduler:8786"
    portal = services["calypso-portal"]
    assert portal["command"][0] == "portal" and portal["ports"] == [
        "${PUBLISH:-127.0.0.1}:8400:8400"
    ]
    watch = services["calypso-watch"]
    assert watch["command"][0] == "watch" and any(v.endswith(":ro") for v in watch["volumes"])
    preloads = {a.split("=", 1)[1] for a in services["dask-worker"]["entrypoint"] if "preload" in a}
    assert preloads == {t.task_module for t in TECHNIQUES.values()}
    # The example configuration it mounts is valid Calypso configuration.
    import tomllib

    from calypso.settings import CalypsoSettings

    CalypsoSettings(**tomllib.loads((DEPLOY / "calypso.toml").read_text()))
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        checked = subprocess.run(
            ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stderr


def test_dockerfile_installs_as_make_install_does():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", dockerfile, re.M)
    assert "make install" in dockerfile and "COPY . /opt/calypso" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_cloud_init_is_cloud_config_without_credentials():
    text = (DEPLOY / "openstack" / "cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert "docker.io" in config["packages"]
    command = " ".join(str(c) for c in config["runcmd"])
    assert "worker tls://" in command and "--tls-key=/etc/calypso/dask.pem" in command
    assert all(f"--preload={t.task_module}" in command for t in TECHNIQUES.values())
    assert not re.search(r"secret|password|AWS_|credential_id", command, re.I)
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("script", ["slurm/single-node.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(DEPLOY / script)]).returncode == 0


def test_prefect_yaml_is_written_from_the_technique_descriptors():
    from calypso.flows.cli import main

    assert main(["deployments", "--check"]) == 0, "run `calypso deployments --write`"
