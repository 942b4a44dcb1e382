"""The ICAT ingester emulator of pyicat-plus[test], recognising messages it already took.

Run as a process by tests/test_icat.py (not collected by pytest). It is the plugin's own
ingester (``stomp_subscriber.MyListener``: parses the message, stores the dataset in the
emulated ICAT's JSON files), with what a real ingester must do when a sender may send a
message twice (a crash after the broker has it, before its receipt): a message whose id
header (``--id-header``) it already took is not stored again, but noted in
``duplicates.txt``. Ids taken are kept in ``message-ids.txt`` beside the records, so an
ingester restarted with the broker remembers them. Its records count datasets, not
messages.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import stomp
from pyicat_plus_pytest_plugin.servers.stomp_subscriber import MyListener


class RecognisingListener(MyListener):
    def __init__(self, conn, data_dir: Path, id_header: str) -> None:
        super().__init__(conn, str(data_dir))
        self.id_header = id_header
        self.taken = data_dir / "message-ids.txt"
        self.duplicates = data_dir / "duplicates.txt"

    def on_message(self, frame) -> None:
        message_id = frame.headers.get(self.id_header)
        if message_id:
            taken = self.taken.read_text().split() if self.taken.exists() else []
            if message_id in taken:
                with self.duplicates.open("a") as out:
                    out.write(f"{message_id}\n")
                return
        super().on_message(frame)
        if message_id:
            with self.taken.open("a") as out:
                out.write(f"{message_id}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="STOMP broker port")
    parser.add_argument("--port_out", type=int, required=True, help="where to echo messages")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--icat_data_dir", type=Path, required=True)
    parser.add_argument("--id-header", required=True)
    args = parser.parse_args()
    conn = stomp.Connection([("localhost", args.port)])
    listener = RecognisingListener(conn, args.icat_data_dir, args.id_header)
    conn.set_listener("", listener)
    conn.connect("guest", "guest", wait=True)
    conn.subscribe(destination=args.queue, id=1, ack="auto")
    listener.redirect_messages(args.port_out)
    listener.s_out.sendall(b"LISTENING\n")
    threading.Event().wait()


if __name__ == "__main__":
    main()
