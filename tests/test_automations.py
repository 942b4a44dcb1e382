"""The automation template (deploy/automations/run-finished.yaml) on the tests' real Prefect
server: installed by `calypso automations install`, it makes the server call a webhook
(a Prefect custom-webhook notification block pointing at an HTTP server of this test)
when a flow run tagged calypso fails or completes, and only then."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import uuid
from contextlib import suppress

import pytest
from prefect import flow, tags
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

from calypso.errors import ConfigurationError
from calypso.flows.cli import main
from calypso.flows.cli.automations import TEMPLATE, from_template

pytestmark = pytest.mark.slow
NAME = "calypso-run-finished"  # the template's


class Hook(http.server.BaseHTTPRequestHandler):
    calls: queue.Queue = queue.Queue()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.calls.put(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@flow(name="calypso-probe")
def probe(raw: str, fail: bool) -> None:
    if fail:
        raise RuntimeError("no frames in lima_0001.h5")


def run_probe(raw: str, fail: bool) -> None:
    with suppress(RuntimeError):  # the failing run's error: what the automation reports
        probe(raw=raw, fail=fail)


def test_the_template_notifies_through_a_webhook_when_a_calypso_run_ends(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    block = f"calypso-test-{uuid.uuid4().hex[:8]}"
    block_id = CustomWebhookNotificationBlock(
        name="calypso",
        url=f"http://127.0.0.1:{server.server_address[1]}/hook",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(block)
    try:
        assert main(["automations", "install", "--block", f"custom-webhook/{block}"]) == 0
        assert f"created automation '{NAME}'" in capsys.readouterr().out
        assert main(["automations", "install", "--block", f"custom-webhook/{block}"]) == 0
        assert f"replaced automation '{NAME}'" in capsys.readouterr().out
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(NAME)) == 1

        run_probe("/data/untagged", fail=True)  # not a calypso run: nobody is told
        with tags("calypso"):
            run_probe("/data/visitor/ih0001/id00/RAW_DATA/s/s_0001", fail=True)
            run_probe("/data/visitor/ih0001/id00/RAW_DATA/s/s_0002", fail=False)
        calls = [Hook.calls.get(timeout=60), Hook.calls.get(timeout=60)]
        with pytest.raises(queue.Empty):
            Hook.calls.get(timeout=2)
        failed, completed = sorted(calls, key=lambda c: "Completed" in c["subject"])
        assert failed["subject"].startswith("Calypso: calypso-probe run ")
        assert failed["subject"].endswith(" Failed")
        assert "RuntimeError: no frames in lima_0001.h5" in failed["body"]
        assert "Raw dataset: /data/visitor/ih0001/id00/RAW_DATA/s/s_0001" in failed["body"]
        assert "Flow run id: " in failed["body"]
        assert completed["subject"].endswith(" Completed")
        assert "s_0002" in completed["body"]
    finally:
        with get_client(sync_client=True) as client:
            for automation in client.read_automations_by_name(NAME):
                client.delete_automation(automation.id)
            client.delete_block_document(block_id)
        server.shutdown()


def test_install_says_what_is_wrong(capsys, tmp_path):
    assert main(["automations", "install", "--block", "custom-webhook/absent"]) == 2
    assert "has no block custom-webhook/absent: create" in capsys.readouterr().err
    assert main(["automations", "install", "--block", "calypso-notify"]) == 2
    assert "give the block's type and name" in capsys.readouterr().err
    name = f"calypso-test-{uuid.uuid4().hex[:8]}"
    secret_id = Secret(value="not a notifier").save(name)
    try:
        assert main(["automations", "install", "--block", f"secret/{name}"]) == 2
        assert f"the block secret/{name} cannot send notifications" in capsys.readouterr().err
    finally:
        with get_client(sync_client=True) as client:
            client.delete_block_document(secret_id)
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("posture: Reactive", "posture: Sideways"))
    with pytest.raises(ConfigurationError, match="broken.yaml is not a Prefect automation"):
        from_template(broken, str(uuid.uuid4()))
