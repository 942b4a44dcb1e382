"""The real ICAT test servers of pyicat-plus[test], for tests/test_icat.py and
tests/test_elogbook.py (not collected by pytest).

The STOMP broker (coilmq), the ICAT ingester emulator, the ActiveMQ REST monitor and the
ICAT+ REST emulator run as processes on loopback. The broker and ICAT+ can be stopped and
started again on the same port (to test the outbox). The ingester is the plugin's,
recognising a message id it already took (tests/icat_ingester.py), as a real one must.
ICAT+ echoes every e-logbook post it accepts to a sink: :attr:`IcatServers.posts`.
"""

from __future__ import annotations

import datetime
import json
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pyicat_plus.client import defaults
from pyicat_plus.client.main import IcatClient
from pyicat_plus_pytest_plugin import _mock_backend, proc, tcp

from calypso.registry.icat import MESSAGE_ID_HEADER
from calypso.settings import IcatSettings

QUEUE = "/queue/icatIngest"
UPDATE_QUEUE = "/queue/icatUpdateDatasetMetadata"
INGESTER = Path(__file__).with_name("icat_ingester.py")
PROPOSALS = ("ih0001", "ih0002")  # investigations on id00, started a day ago


def start_ingester(broker_port: int, port_out: int, queue: str, data_dir: Path):
    """The plugin's ingester, recognising message ids it already took."""
    return subprocess.Popen(
        [
            sys.executable,
            "-u",
            str(INGESTER),
            f"--port={broker_port}",
            f"--port_out={port_out}",
            f"--queue={queue}",
            f"--icat_data_dir={data_dir}",
            f"--id-header={MESSAGE_ID_HEADER}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_server(port: int, module: str, *arguments: str):
    """One of the plugin's servers, waited for 60 s (the plugin waits 5: too short when the
    machine is busy); stopped if it does not open its port."""
    server = _mock_backend.spawn_server(module, *arguments, quiet=True)
    try:
        tcp.wait_tcp_online("localhost", port, timeout=60)
    except BaseException:
        proc.wait_terminate(server)
        raise
    return server


class IcatServers:
    """Broker, ingester, ICAT+ and queue monitor; the broker and ICAT+ can be stopped and
    restarted."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.broker_port = tcp.get_open_port()
        self.monitor_port = tcp.get_open_port()
        self.icatplus_port = tcp.get_open_port()
        self._sinks = []
        self.broker = self.ingester = self.updater = self.icatplus = self.monitor = None
        self.posts: queue.Queue = queue.Queue()
        try:  # a server that does not start: stop the others (their sinks wait for them)
            port = self.monitor_port
            self.monitor = start_server(port, "activemq_rest_server", f"--port={port}")
            self.start_broker()
            self.start_icatplus()
        except BaseException:
            self.close()
            raise

    def start_broker(self) -> None:
        port = self.broker_port
        self.broker = start_server(port, "coilmq", "-b", "127.0.0.1", "-p", str(port))
        sink = tcp.tcp_message_server(validate_all=False)
        port, messages = sink.__enter__()
        self._sinks.append(sink)
        self.ingester = start_ingester(self.broker_port, port, QUEUE, self.data_dir)
        assert messages.get(timeout=60) == "LISTENING"  # imports take long on a busy machine
        # Metadata updates of registered datasets (e.g. where they were exported).
        sink = tcp.tcp_message_server(validate_all=False)
        port, self.updates = sink.__enter__()
        self._sinks.append(sink)
        self.updater = start_ingester(self.broker_port, port, UPDATE_QUEUE, self.data_dir)
        assert self.updates.get(timeout=60) == "LISTENING"

    def stop_broker(self) -> None:
        proc.wait_terminate(self.ingester)
        proc.wait_terminate(self.updater)
        self.broker.kill()
        self.broker.wait()

    def start_icatplus(self) -> None:
        """ICAT+, echoing each post it accepts to a new sink (a sink takes one connection),
        whose posts :attr:`posts` then holds."""
        while True:
            sink = tcp.tcp_message_server("json", validate_all=False)
            port, self.posts = sink.__enter__()
            self._sinks.append(sink)
            # ICAT+'s own port was only picked (bound and closed): the sink may be given
            # the same number. It would then take start_server's probe as its one
            # connection, and ICAT+ would not start (a CI run waited 60 s for it).
            if port != self.icatplus_port:
                break
        self.icatplus = start_server(
            self.icatplus_port,
            "icatplus_server",
            f"--port={self.icatplus_port}",
            f"--port_out={port}",
            f"--icat_data_dir={self.data_dir}",
        )
        assert self.posts.get(timeout=60) == {"STATUS": "LISTENING"}

    def stop_icatplus(self) -> None:
        self.icatplus.kill()
        self.icatplus.wait()

    def close(self) -> None:
        for process in (self.ingester, self.updater, self.broker, self.icatplus, self.monitor):
            if process is not None and process.poll() is None:
                proc.wait_terminate(process)
        for sink in self._sinks:
            sink.__exit__(None, None, None)

    def settings(self, **changes) -> IcatSettings:
        values = {
            "metadata_urls": [f"localhost:{self.broker_port}"],
            "queue_monitor_port": self.monitor_port,
            "icatplus_url": f"http://localhost:{self.icatplus_port}",
            "icatplus_token": defaults.ELOGBOOK_TOKEN,
            "timeout_s": 5,
        }
        return IcatSettings(**{**values, **changes})

    def client(self) -> IcatClient:
        s = self.settings()
        return IcatClient(
            metadata_urls=s.metadata_urls,
            elogbook_url=s.icatplus_url,
            elogbook_token=defaults.ELOGBOOK_TOKEN,
            metadata_queue_monitor_port=s.queue_monitor_port,
        )

    def datasets(self) -> list[dict]:
        """What the ingester stored (its files may be mid-write: read again then)."""
        for _ in range(50):
            try:
                found = []
                for path in sorted(self.data_dir.glob("datasets*.json")):
                    found += json.loads(path.read_text())
                return found
            except json.JSONDecodeError:
                time.sleep(0.1)
        raise AssertionError(f"the ingester's files in {self.data_dir} stay unreadable")

    def duplicates(self) -> list[str]:
        """Message ids the ingester received again and dropped."""
        path = self.data_dir / "duplicates.txt"
        return path.read_text().split() if path.exists() else []

    def received_posts(
        self, count: int = 0, wait_s: float = 30.0, then_s: float = 0.5
    ) -> list[dict[str, Any]]:
        """The e-logbook posts ICAT+ accepted since the last call: ``count`` of them, waited
        for up to ``wait_s`` seconds (its echo of an image takes a while: the sink reads
        16 KiB every 0.1 s), then any more that come within ``then_s`` seconds."""
        found, deadline = [], time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic() if len(found) < count else then_s
            try:
                found.append(self.posts.get(timeout=max(0.05, left)))
            except queue.Empty:
                return found


@contextmanager
def running_icat(data_dir: Path) -> Iterator[IcatServers]:
    """The servers, with investigations :data:`PROPOSALS` on id00 started."""
    servers = IcatServers(data_dir)
    try:
        client = servers.client()
        start = datetime.datetime.now().astimezone() - datetime.timedelta(days=1)
        for proposal in PROPOSALS:
            client.start_investigation(beamline="id00", proposal=proposal, start_datetime=start)
        client.disconnect()
        yield servers
    finally:
        servers.close()


def use_icat(
    icat: IcatServers, monkeypatch: pytest.MonkeyPatch, catalogue: Path, **settings: str
) -> Path:
    """This process's (and its children's) settings: the ICAT backend on ``icat``, the
    catalogue in ``catalogue``; ``settings``: more CALYPSO_CATALOGUE__ICAT__* values."""
    values = icat.settings()
    monkeypatch.setenv("CALYPSO_CATALOGUE__BACKEND", "icat")
    monkeypatch.setenv("CALYPSO_CATALOGUE__PATH", str(catalogue))
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__METADATA_URLS", json.dumps(values.metadata_urls))
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__QUEUE_MONITOR_PORT", str(icat.monitor_port))
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__ICATPLUS_URL", values.icatplus_url)
    monkeypatch.setenv("CALYPSO_CATALOGUE__ICAT__ICATPLUS_TOKEN", defaults.ELOGBOOK_TOKEN)
    for name, value in settings.items():
        monkeypatch.setenv(f"CALYPSO_CATALOGUE__ICAT__{name.upper()}", value)
    return catalogue


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False
