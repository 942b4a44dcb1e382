"""Export to object storage, against moto's standalone S3 server on loopback.

The server enforces credentials (IAM, as AWS does) and keeps object versions,
so the tests count uploads on the server's side, not from Calypso's report.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calypso.errors import ExportError
from calypso.flows.cli import main
from calypso.registry import SQLiteCatalogue
from calypso.settings import load_settings
from calypso.tasks.export import MANIFEST_NAME, export_dataset, verify_export
from calypso.tasks.writers.nexus import PARTIAL_PREFIX

boto3 = pytest.importorskip("boto3")
# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]
REPO = Path(__file__).resolve().parents[1]


class S3Server:
    """moto's server process with one IAM user allowed everything on S3."""

    def __init__(self, loopback, log: Path) -> None:
        port = loopback.free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the 3 IAM calls below
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=open(log, "wb"),  # noqa: SIM115 (the server's log, open while it runs)
            stderr=subprocess.STDOUT,
            env=env,
        )
        loopback.wait_for_http(f"{self.endpoint}/moto-api/", timeout=60, process=self.process)
        iam = self._client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="calypso")
        iam.put_user_policy(
            UserName="calypso",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="calypso")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = self._client("s3", self.key, self.secret)

    def _client(self, service: str, key: str, secret: str):
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        self.s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def versions(self, bucket: str, prefix: str) -> dict[str, int]:
        """How many times each key was written (one version per completed upload)."""
        counts: dict[str, int] = {}
        pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for version in page.get("Versions", []):
                counts[version["Key"]] = counts.get(version["Key"], 0) + 1
        return counts

    def env(self, **changes: str) -> dict[str, str]:
        values = {
            "CALYPSO_EXPORT__ENDPOINT_URL": self.endpoint,
            "CALYPSO_EXPORT__REGION": "us-east-1",
            "CALYPSO_EXPORT__ACCESS_KEY_ID": self.key,
            "CALYPSO_EXPORT__SECRET_ACCESS_KEY": self.secret,
            "CALYPSO_EXPORT__PART_SIZE_MB": "5",
        }
        return values | changes

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, loopback):
    server = S3Server(loopback, tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.close()


@pytest.fixture
def s3_env(s3, monkeypatch, catalogue_path):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def processed_dataset(root: Path, small: int = 30, large: int = 2, seed: int = 0) -> Path:
    """Result-like files: a few multipart-sized (12 MB) ones and many small ones."""
    rng = __import__("numpy").random.default_rng(seed)
    folder = root / "PROCESSED_DATA" / "sample" / "sample_0001" / "diffraction"
    (folder / "patterns").mkdir(parents=True)
    for i in range(large):
        (folder / f"volume_{i}.h5").write_bytes(rng.bytes(12 * 2**20))
    for i in range(small):
        (folder / "patterns" / f"pattern_{i:04d}.dat").write_bytes(rng.bytes(200_000))
    scratch = folder / f"{PARTIAL_PREFIX}0123"  # a run's scratch folder is never exported
    scratch.mkdir()
    (scratch / "part.h5").write_bytes(b"x")
    return folder


def local_checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and PARTIAL_PREFIX not in p.as_posix()
    }


def test_export_lists_downloads_and_matches_checksums(s3_env, tmp_path, capsys):
    bucket = s3_env.bucket("results-a")
    source = processed_dataset(tmp_path, small=12)
    code = main(["export", str(source), "--to", f"s3://{bucket}/ih0001/run1", "--verify", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    expected = local_checksums(source)
    assert summary["files"] == len(expected) == 14 and summary["uploaded"] == 14
    assert summary["verified"] is True

    listed = s3_env.s3.list_objects_v2(Bucket=bucket, Prefix="ih0001/run1/")["Contents"]
    keys = {o["Key"].removeprefix("ih0001/run1/") for o in listed}
    assert keys == set(expected) | {MANIFEST_NAME}
    for relative, digest in expected.items():
        body = s3_env.s3.get_object(Bucket=bucket, Key=f"ih0001/run1/{relative}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
    manifest = s3_env.s3.get_object(Bucket=bucket, Key=f"ih0001/run1/{MANIFEST_NAME}")
    lines = manifest["Body"].read().decode().splitlines()
    assert dict(reversed(line.split("  ")) for line in lines) == expected
    # The 12 MB files went as multipart uploads (5 MB parts): their ETag says so.
    head = s3_env.s3.head_object(Bucket=bucket, Key="ih0001/run1/volume_0.h5")
    assert head["ETag"].strip('"').endswith("-3")

    exports = SQLiteCatalogue(os.environ["CALYPSO_CATALOGUE__PATH"]).exports(source=str(source))
    assert [(e.uri, e.files, e.verified) for e in exports] == [
        (f"s3://{bucket}/ih0001/run1", 14, True)
    ]

    # Verification catches an object changed behind our back.
    s3_env.s3.put_object(Bucket=bucket, Key="ih0001/run1/patterns/pattern_0003.dat", Body=b"x")
    with pytest.raises(ExportError, match=r"pattern_0003.dat: SHA-256"):
        verify_export(f"s3://{bucket}/ih0001/run1", load_settings())


def test_a_killed_export_resumes_sending_only_what_is_missing(s3_env, tmp_path, capsys):
    bucket = s3_env.bucket("results-b")
    source = processed_dataset(tmp_path, small=100, large=3, seed=2)
    target = f"s3://{bucket}/resume"
    # One file at a time, so the export is still going when the test has seen a few land.
    env = dict(os.environ, CALYPSO_EXPORT__FILES_AT_ONCE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "export", str(source), "--to", target],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(s3_env.versions(bucket, "resume/")) < 5:
        assert process.poll() is None, "the export finished before it could be interrupted"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    # An upload whose request the server had whole before the kill still completes there:
    # what was sent is what the server holds once its listing stops changing.
    before = s3_env.versions(bucket, "resume/")
    while True:
        time.sleep(1.0)
        settled = s3_env.versions(bucket, "resume/")
        if settled == before:
            break
        before = settled
    assert 5 <= len(before) < 103 and f"resume/{MANIFEST_NAME}" not in before
    catalogue = SQLiteCatalogue(os.environ["CALYPSO_CATALOGUE__PATH"])
    assert catalogue.exports(source=str(source)) == []  # nothing recorded as exported

    assert main(["export", str(source), "--to", target, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    after = s3_env.versions(bucket, "resume/")
    expected = local_checksums(source)
    missing = {r for r in expected if f"resume/{r}" not in before}
    # Server side: every object written once in all; the second run wrote only what
    # was missing (and the manifest); the client side says the same.
    assert all(count == 1 for count in after.values()), after
    assert set(after) - set(before) == {f"resume/{r}" for r in missing} | {
        f"resume/{MANIFEST_NAME}"
    }
    assert report["uploaded"] == len(missing) and report["already_there"] == len(before)
    # No half-sent multipart upload is left to pay for.
    assert s3_env.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert verify_export(target, load_settings(), expected=set(expected)) == len(expected)
    assert [e.uploaded for e in catalogue.exports(source=str(source))] == [len(missing)]


@pytest.mark.parametrize(
    ("change", "bucket", "message"),
    [
        ({"CALYPSO_EXPORT__SECRET_ACCESS_KEY": "not-the-secret-1234"}, "results-c", "refused"),
        ({}, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
        ({"CALYPSO_EXPORT__ENDPOINT_URL": "http://127.0.0.1:9"}, "results-c", "cannot reach"),
    ],
    ids=["wrong-credentials", "missing-bucket", "unreachable-endpoint"],
)
def test_bad_targets_fail_clearly_and_record_nothing(
    s3_env, tmp_path, monkeypatch, capsys, change, bucket, message
):
    if bucket == "results-c" and "results-c" not in {
        b["Name"] for b in s3_env.s3.list_buckets()["Buckets"]
    }:
        s3_env.bucket("results-c")
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    source = processed_dataset(tmp_path, small=3, large=0)
    assert main(["export", str(source), "--to", f"s3://{bucket}/x"]) == 6
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    for secret in (s3_env.secret, "not-the-secret-1234"):
        assert secret not in err
    assert SQLiteCatalogue(os.environ["CALYPSO_CATALOGUE__PATH"]).exports() == []
    if bucket == "results-c":
        assert "Contents" not in s3_env.s3.list_objects_v2(Bucket="results-c", Prefix="x/")


def test_credentials_in_the_uri_are_refused(s3_env, tmp_path, capsys):
    source = processed_dataset(tmp_path, small=1, large=0)
    assert main(["export", str(source), "--to", "s3://AKIA:secret@bucket/x"]) == 2
    assert "must not carry credentials" in capsys.readouterr().err


def test_credentials_from_a_prefect_secret_block(s3, tmp_path, monkeypatch, catalogue_path):
    from prefect.blocks.system import Secret

    bucket = s3.bucket("results-d")
    Secret(value=json.dumps({"access_key_id": s3.key, "secret_access_key": s3.secret})).save(
        "calypso-test-s3", overwrite=True
    )
    env = s3.env()
    for name in ("CALYPSO_EXPORT__ACCESS_KEY_ID", "CALYPSO_EXPORT__SECRET_ACCESS_KEY"):
        del env[name]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CALYPSO_EXPORT__CREDENTIALS_BLOCK", "calypso-test-s3")
    report = export_dataset(
        processed_dataset(tmp_path, small=2, large=0), f"s3://{bucket}/b", load_settings()
    )
    assert len(report.uploaded) == 2


def test_export_to_a_folder_resumes_by_checksum(tmp_path, catalogue_path):
    source = processed_dataset(tmp_path / "in", small=5, large=1)
    target = tmp_path / "out" / "run"
    first = export_dataset(source, str(target), load_settings(), verify=True)
    assert len(first.uploaded) == 6 and first.verified
    (target / "patterns" / "pattern_0001.dat").write_bytes(b"damaged")
    (target / "volume_0.h5").unlink()
    second = export_dataset(source, str(target), load_settings(), include=["*.dat", "*.h5"])
    assert sorted(second.uploaded) == ["patterns/pattern_0001.dat", "volume_0.h5"]
    assert local_checksums(target) == local_checksums(source) | {
        MANIFEST_NAME: local_checksums(target)[MANIFEST_NAME]
    }


def test_an_export_over_a_finished_one_stopped_midway_is_never_complete_looking(
    tmp_path, catalogue_path, monkeypatch
):
    """A newer result exported to a finished export's target and stopped after its first
    file (a sweep SIGKILLed one): the old manifest stayed over the new objects, and said
    the export was complete. It goes first; the rerun completes the export."""
    from fsspec.implementations.local import LocalFileSystem

    target = tmp_path / "out" / "run"
    export_dataset(
        processed_dataset(tmp_path / "old", small=3, large=0), str(target), load_settings()
    )
    assert (target / MANIFEST_NAME).exists()
    newer = processed_dataset(tmp_path / "new", small=3, large=0, seed=1)
    put_file, sent = LocalFileSystem.put_file, []

    def killed_after_one(self, lpath, rpath, **kwargs):
        if sent:
            raise OSError("killed")
        sent.append(rpath)
        return put_file(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", killed_after_one)
    with pytest.raises(ExportError, match="stopped"):
        export_dataset(newer, str(target), load_settings())
    assert len(sent) == 1 and not (target / MANIFEST_NAME).exists()
    with pytest.raises(ExportError, match="never finished"):
        verify_export(str(target), load_settings())
    monkeypatch.setattr(LocalFileSystem, "put_file", put_file)
    export_dataset(newer, str(target), load_settings(), verify=True)
    assert local_checksums(target) == local_checksums(newer) | {
        MANIFEST_NAME: local_checksums(target)[MANIFEST_NAME]
    }


def test_a_flow_run_exports_its_results_with_export_to(
    s3_env, diffraction_sample, monkeypatch, capsys, scheduler
):
    from calypso.flows.api import run_technique
    from calypso.techniques.diffraction import DiffractionParameters

    bucket = s3_env.bucket("results-e")
    parameters = DiffractionParameters(
        poni=str(diffraction_sample.calibration["poni"]),
        mask=str(diffraction_sample.calibration["mask"]),
        npt=200,
    )
    settings = load_settings(executor={"kind": "address", "address": scheduler})
    summary = run_technique(
        "diffraction",
        str(diffraction_sample.raw_dataset_dir),
        parameters,
        None,
        None,
        settings,
        export_to=f"s3://{bucket}/facility",
    )
    export = summary["export"]
    raw = diffraction_sample.raw_dataset_dir
    session = raw.parents[2]
    # The version folder: other tests' results of this shared sample, which this test's
    # catalogue does not hold, are never written over.
    processed = Path(summary["processed_dataset_dir"])
    assert processed.name.startswith("diffraction")
    prefix = (
        f"facility/{session.parents[1].name}/{session.parent.name}/{session.name}/"
        f"{raw.parent.name}/{raw.name}/{processed.name}"
    )
    assert export["uri"] == f"s3://{bucket}/{prefix}"
    keys = {o["Key"] for o in s3_env.s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"{prefix}/{r}" for r in local_checksums(processed)} | {
        f"{prefix}/{MANIFEST_NAME}"
    }
    assert main(["catalogue", "show", str(summary["catalogue_id"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["uri"] for e in shown["exports"]] == [export["uri"]]
    # The run's export showed its progress in the UI as an artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[summary["flow_run_id"]])
            )
        )
    exporting = [a for a in artifacts if (a.description or "").startswith("Exporting")]
    assert len(exporting) == 1 and exporting[0].data == 100.0


def test_two_datasets_exported_without_a_target_do_not_meet(
    tmp_path, catalogue_path, capsys, monkeypatch
):
    """Without --to the default was <home>/export/<folder name>: every result folder is
    named after its technique, so a second dataset's export replaced the first one's
    files and manifest, exit 0 (a fresh-checkout walk). Each goes to its data-policy
    path now: from its catalogue record's raw dataset, else below its PROCESSED_DATA."""
    from calypso.registry import ProcessedDataset
    from calypso.tasks.export import default_export_uri

    monkeypatch.setenv("CALYPSO_EXPORT__DEFAULT_TARGET", str(tmp_path / "exports"))
    session = tmp_path / "visitor" / "ih0001" / "id00" / "20261207"
    folders = []
    for dataset in ("CeO2_0001", "CeO2_0002"):
        folder = session / "PROCESSED_DATA" / "CeO2" / dataset / "diffraction"
        folder.parent.mkdir(parents=True)
        folders.append(processed_dataset(tmp_path / dataset, small=2, large=0).rename(folder))
    for folder in folders:
        assert main(["export", str(folder), "--json"]) == 0
        uri = json.loads(capsys.readouterr().out)["uri"]
        assert uri.endswith(f"ih0001/id00/20261207/CeO2/{folder.parent.name}/diffraction")
    exported = tmp_path / "exports" / "ih0001" / "id00" / "20261207" / "CeO2"
    assert sorted(p.name for p in exported.iterdir()) == ["CeO2_0001", "CeO2_0002"]
    raw = session / "RAW_DATA" / "CeO2" / "CeO2_0001"
    record = ProcessedDataset(technique="diffraction", raw_dataset=str(raw), processed_path="x")
    elsewhere = tmp_path / "scratch" / "diffraction"  # written with --output
    assert default_export_uri("s3://b/p", elsewhere, record) == (
        "s3://b/p/ih0001/id00/20261207/CeO2/CeO2_0001/diffraction"
    )
    assert default_export_uri("s3://b/p", elsewhere, None) == "s3://b/p/diffraction"
