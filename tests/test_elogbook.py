"""E-logbook posts against pyicat-plus' ICAT+ emulator (a real HTTP server process on
loopback, with the broker and ingester it needs: tests/icat_servers.py).

The emulator echoes every post it accepts, so the tests count what the logbook got. Its
answer to a proposal whose name holds 666 is 400 Bad Request: a post ICAT+ refuses.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

pytest.importorskip("pyicat_plus_pytest_plugin")

from calypso.flows.cli import main
from calypso.registry import ProcessedDataset, SQLiteCatalogue
from calypso.registry import elogbook as elog
from calypso.registry.icat import IcatCatalogue
from calypso.settings import IcatSettings
from tests.icat_servers import running_icat, use_icat

# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]
TOKEN = "calypso-test-icatplus-token-7f3e9a"  # recognisable wherever it would leak


@pytest.fixture(scope="module")
def icat(tmp_path_factory):
    with running_icat(tmp_path_factory.mktemp("icat")) as servers:
        yield servers


def kinds(posts: list[dict]) -> list[str]:
    return sorted("image" if "base64" in p else "message" for p in posts)


def test_a_run_posts_once_after_icatplus_comes_back(
    icat, monkeypatch, tmp_path, diffraction_sample, capsys, caplog
):
    catalogue = use_icat(icat, monkeypatch, tmp_path / "catalogue.sqlite", icatplus_token=TOKEN)
    monkeypatch.setenv("CALYPSO_EXECUTOR__N_WORKERS", "1")
    calibration = diffraction_sample.calibration
    run = ["run", "diffraction", str(diffraction_sample.raw_dataset_dir)]
    run += ["--set", f"poni={calibration['poni']}", "--set", f"mask={calibration['mask']}"]
    icat.stop_icatplus()
    try:
        assert main([*run, "--set", "npt=200"]) == 0  # the post waits; the run succeeds
        out, err = capsys.readouterr()
        assert "e-logbook post of" in out + err and "waiting in the outbox" in out + err
        assert main(["catalogue", "flush"]) == 5  # ICAT+ still down: the posts stay owed
        out, err = capsys.readouterr()
        assert "delivery stopped: e-logbook:" in err
    finally:
        icat.start_icatplus()
    [record] = SQLiteCatalogue(catalogue).list()
    owed = SQLiteCatalogue(catalogue).outbox("owed")
    # The message was tried at the run's end and by the flush, each stopping there.
    assert [(e.destination, e.payload["kind"], e.attempts) for e in owed] == [
        (elog.DESTINATION, "message", 2),
        (elog.DESTINATION, "image", 0),
    ]
    logged = out + err + caplog.text + "".join(e.last_error or "" for e in owed)
    assert "ICAT+ cannot be reached" in owed[0].last_error and TOKEN not in logged

    assert main(["catalogue", "flush"]) == 0
    assert "posted 2 message(s) and image(s) to the e-logbook" in capsys.readouterr().out
    posts = icat.received_posts(2)
    assert kinds(posts) == ["image", "message"]
    where = {(p["investigation"], p["instrument"], p["apikey"]) for p in posts}
    assert where == {("ih0001", "id00", TOKEN)}
    [message] = [p for p in posts if "base64" not in p]
    assert (message["type"], message["category"]) == ("notification", "info")
    assert message["datasetName"] == diffraction_sample.raw_dataset_dir.name
    assert {t["name"] for t in message["tag"]} >= {"calypso", "diffraction"}
    [content] = message["content"]
    text = content["text"]
    assert content["format"] == "html" and "Calypso diffraction completed" in text
    assert f"results: {record.processed_path}" in text and "12 frames in" in text
    assert f"/runs/flow-run/{record.flow_run_id}" in text
    [image] = [p for p in posts if "base64" in p]
    [look] = [e for e in SQLiteCatalogue(catalogue).outbox() if e.payload.get("kind") == "image"]
    png = Path(look.payload["path"]).read_bytes()
    assert image["base64"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert "data" not in look.payload  # posted: its bytes left the catalogue

    assert main(["catalogue", "flush"]) == 0  # nothing more to post
    assert "posted" not in capsys.readouterr().out
    assert icat.received_posts(then_s=2.0) == []  # an image's echo takes over a second


def record(proposal: str, flow_run_id: str, **changes) -> ProcessedDataset:
    session = f"/data/visitor/{proposal}/id00/20261125"
    return ProcessedDataset(
        technique="diffraction",
        raw_dataset=f"{session}/RAW_DATA/lab6/lab6_0001",
        processed_path=f"{session}/PROCESSED_DATA/lab6/lab6_0001/diffraction",
        proposal=proposal,
        beamline="id00",
        sample_name="LaB6",
        flow_run_id=flow_run_id,
        **changes,
    )


def test_a_failed_run_posts_its_error_and_a_refused_post_holds_back_no_other(icat, tmp_path):
    catalogue = IcatCatalogue(SQLiteCatalogue(tmp_path / "c.sqlite"), icat.settings())
    failure = "cannot read frame 7 of lima_0001.h5\nTraceback (most recent call last): ..."
    refused = catalogue.local.register(record("ih0666", "refused", status="failed"))
    failed = catalogue.local.register(record("ih0002", "failed", status="failed", message=failure))
    warning = catalogue.post(refused)  # ICAT+ answers 400: it stays owed, with why
    assert "e-logbook post of" in warning and "400" in warning
    assert catalogue.post(failed) is None  # not held back by the refused one
    [message] = icat.received_posts(1)
    assert (message["investigation"], message["category"]) == ("ih0002", "error")
    text = message["content"][0]["text"]
    assert "Calypso diffraction failed" in text
    assert "<b>error:</b> cannot read frame 7 of lima_0001.h5" in text
    assert "Traceback" not in text  # the error line only
    [owed] = catalogue.outbox("pending")
    assert (owed.record_id, owed.state, owed.attempts) == (refused, "pending", 2)
    assert "Bad Request" in owed.last_error
    assert catalogue.post(failed) is None  # posted once: a second call owes nothing
    assert icat.received_posts() == []


def test_posts_can_be_turned_off(icat, tmp_path):
    settings = icat.settings(elogbook=False)
    catalogue = IcatCatalogue(SQLiteCatalogue(tmp_path / "c.sqlite"), settings)
    record_id = catalogue.local.register(record("ih0002", "quiet"))
    assert catalogue.post(record_id) is None
    assert catalogue.outbox() == [] and icat.received_posts() == []


def test_a_post_icatplus_does_not_answer_stays_owed(tmp_path):
    """pyicat-plus counts a timed-out post as done; the outbox keeps it, to post again."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        settings = IcatSettings(
            metadata_urls=["localhost:1"],
            icatplus_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            icatplus_token=TOKEN,
            timeout_s=1,
        )
        catalogue = IcatCatalogue(SQLiteCatalogue(tmp_path / "c.sqlite"), settings)
        warning = catalogue.post(catalogue.local.register(record("ih0002", "silent")))
    assert "Unconfirmed: ICAT+ did not answer within 1 s" in warning and TOKEN not in warning
    [owed] = catalogue.outbox("pending")
    assert (owed.attempts, owed.payload["kind"]) == (1, "message")
