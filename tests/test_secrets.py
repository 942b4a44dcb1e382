"""Credentials never appear in what a run writes (docs/security.md, "Secrets").

Every secret setting is given a canary value; the S3 key pair lives in a Prefect Secret
block stored as a dict (the way these docs once said, which Prefect's API returns in
clear). Then real ``calypso run`` processes: one that succeeds, registers with ICAT (whose
broker and ICAT+ do not answer: pyicat-plus logs its failure with the ICAT+ URL, which
carries the token) and exports to moto's S3 server; one that fails in its chunks; an
export that fails. Then everything they wrote is searched for the canaries: their
output, the results, Calypso's home (catalogue, kept chunk results), and the Prefect
server's flow runs, task runs, logs, artifacts, blocks and its database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.damage import damage_stored_frame
from tests.processes import wait_until
from tests.test_export import S3Server

BLOCK = f"calypso-canary-{uuid.uuid4().hex[:8]}"


def canary(name: str) -> str:
    return f"canary-{name}-{uuid.uuid4().hex}"


CANARIES = {
    "CALYPSO_CATALOGUE__ICAT__ICATPLUS_TOKEN": canary("icatplus"),
    "CALYPSO_ACCESS__LDAP__BIND_PASSWORD": canary("ldap"),
    "CALYPSO_ACCESS__OIDC__CLIENT_SECRET": canary("oidc"),
    "CALYPSO_EXECUTOR__OPENSTACK__APPLICATION_CREDENTIAL_SECRET": canary("openstack"),
    "CALYPSO_EXPORT__SECRET_ACCESS_KEY": canary("s3"),  # the block comes first: unused
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory, loopback):
    server = S3Server(loopback, tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.close()


def closed_port(loopback) -> int:
    return loopback.free_port()  # nothing listens there: refused at once


def calypso(env: dict[str, str], *arguments: str | Path) -> subprocess.Popen:
    """``calypso ARGUMENTS`` started (the runs go at once: the test stays short)."""
    return subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", *map(str, arguments)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def files_holding(folder: Path, secrets: list[str]) -> list[str]:
    """``path: secret`` for every file under ``folder`` holding one of ``secrets``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in content]
    return found


def prefect_records(since: datetime) -> tuple[str, list]:
    """What the Prefect API holds about the runs started since ``since``: flow runs (with
    their parameters and states), task runs, logs and artifacts, as JSON; and the logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=since)
            )
        )
        ids = [run.id for run in runs]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)),
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        blocks = client.read_block_documents(include_secrets=False)
    text = json.dumps(
        [x.model_dump(mode="json") for x in (*runs, *tasks, *logs, *artifacts, *blocks)]
    )
    return text, logs


def test_errors_logs_and_uncaught_tracebacks_hide_the_settings_secrets(tmp_path):
    """In a process of its own (redaction is process-wide): a Calypso error quoting what
    failed, a library's log record with a traceback, and an exception nobody catches."""
    secret = canary("oidc")
    script = tmp_path / "leak.py"
    script.write_text(
        "import logging, sys\n"
        "from calypso.errors import ExportError\n"
        "from calypso.settings import load_settings\n"
        "load_settings()\n"
        f"url = 'https://icat.example.org/dataacquisition/{secret}/investigation'\n"
        "print(ExportError(f'cannot reach {url}'))\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s: %(message)s')\n"
        "try:\n"
        "    raise ConnectionError(f'Max retries exceeded with url: {url}')\n"
        "except ConnectionError:\n"
        "    logging.getLogger('pyicat_plus').exception('query failed: %s', url)\n"
        "raise RuntimeError(url)\n"
    )
    env = dict(os.environ, CALYPSO_ACCESS__OIDC__CLIENT_SECRET=secret)
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    masked = "https://icat.example.org/dataacquisition/********/investigation"
    assert result.stdout.splitlines()[0] == f"cannot reach {masked}"
    assert f"pyicat_plus: query failed: {masked}" in result.stdout
    assert f"ConnectionError: Max retries exceeded with url: {masked}" in result.stdout
    assert result.returncode == 1 and f"RuntimeError: {masked}" in result.stderr
    assert secret not in result.stdout + result.stderr


@pytest.mark.slow
def test_no_credential_reaches_anything_a_run_writes(
    s3, diffraction_sample, tmp_path, loopback, capsys
):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    since = datetime.now(UTC)
    bucket = s3.bucket(f"canary-{uuid.uuid4().hex[:8]}")
    # The old way: a dict, which Prefect's API returns in clear.
    Secret(value={"access_key_id": s3.key, "secret_access_key": s3.secret}).save(BLOCK)
    home, out = tmp_path / "home", tmp_path / "out"
    env = dict(os.environ) | CANARIES
    env |= {
        "CALYPSO_HOME": str(home),
        "CALYPSO_CATALOGUE__BACKEND": "icat",
        "CALYPSO_CATALOGUE__ICAT__METADATA_URLS": f'["127.0.0.1:{closed_port(loopback)}"]',
        "CALYPSO_CATALOGUE__ICAT__ICATPLUS_URL": f"http://127.0.0.1:{closed_port(loopback)}",
        "CALYPSO_CATALOGUE__ICAT__TIMEOUT_S": "1",
        "CALYPSO_EXPORT__ENDPOINT_URL": s3.endpoint,
        "CALYPSO_EXPORT__REGION": "us-east-1",
        "CALYPSO_EXPORT__ACCESS_KEY_ID": "canary-key-id-unused",
        "CALYPSO_EXPORT__CREDENTIALS_BLOCK": BLOCK,
    }
    secrets = [*CANARIES.values(), s3.secret, s3.key]
    poni, mask = diffraction_sample.calibration["poni"], diffraction_sample.calibration["mask"]
    options = ["--set", f"poni={poni}", "--set", f"mask={mask}", "--workers", "1", "-v"]
    raw = diffraction_sample.dataset
    broken = tmp_path / "visitor" / raw.raw_dataset_dir.relative_to(raw.root)
    shutil.copytree(raw.raw_dataset_dir, broken)
    damage_stored_frame(broken, 7)  # a damaged frame: the run fails in its chunks

    (out / "some").mkdir(parents=True)
    (out / "some" / "result.h5").write_bytes(b"x")

    # A succeeding run, whose ICAT registration fails, and which exports; a run failing in
    # its chunks; an export failing: every secret in use.
    processes = [
        calypso(
            env, "run", "diffraction", raw.raw_dataset_dir, *options,
            "--output", out / "good", "--export-to", f"s3://{bucket}/runs",
        ),
        calypso(
            env, "run", "diffraction", broken, *options, "--output", out / "bad",
        ),
        # The key pair of the settings (the canary secret), which the store refuses.
        calypso(
            {k: v for k, v in env.items() if k != "CALYPSO_EXPORT__CREDENTIALS_BLOCK"},
            "export", out / "some", "--to", f"s3://{bucket}/refused",
        ),
    ]  # fmt: skip
    ran, failed, refused = map(finished, processes)
    assert ran.returncode == 0, ran.stderr
    # pyicat-plus logged its failed ICAT+ query with its URL: the token is out of it.
    assert "/dataacquisition/********/investigation" in ran.stderr
    assert "waiting in the outbox" in ran.stderr  # the registration failed
    assert f"the Prefect Secret block {BLOCK!r} held a dict" in ran.stderr
    assert failed.returncode == 3 and "cannot be read" in failed.stderr
    assert refused.returncode == 6 and "refused access" in refused.stderr

    # The block is now stored as text, which Prefect's API masks.
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(BLOCK, "secret", include_secrets=False)
    assert stored.data["value"] == "********"
    # The runs' logs reached the API (the failure's traceback among them) before the search.
    text, _ = wait_until(
        lambda: (
            (found := prefect_records(since))
            and any("cannot be read" in log.message for log in found[1])
            and found
        ),
        60,
        "the failed run's logs in the Prefect API",
    )
    leaks = [
        f"{where}: {secret}"
        for where, content in [
            ("run output", ran.stdout + ran.stderr),
            ("failed run output", failed.stdout + failed.stderr),
            ("export output", refused.stdout + refused.stderr),
            ("Prefect API", text),
        ]
        for secret in secrets
        if secret in content
    ]
    leaks += files_holding(out, secrets) + files_holding(home, secrets)
    database = Path(os.environ.get("PREFECT_HOME", "")) / "prefect.db"
    if database.is_file():  # the test server's own: everything it was told, events too
        leaks += files_holding(database.parent, secrets)
    assert leaks == []
    assert {p.name for p in (out / "good").glob("*.h5")} and (home / "catalogue.sqlite").exists()
