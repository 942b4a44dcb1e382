"""Sessions ended by signing out, until their cookies would have expired anyway.

A session cookie is signed, not stored: without this list a copy of it taken before
``/signout`` (a shared computer, a proxy's log) kept working until it expired. Each
sign-in has a random session id; signing out adds it here, in a private file of
Calypso's home, so that every portal process (and a restarted one) refuses it.
"""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

from calypso.private_files import create_private_file, private_folder, read_private_file

NAME = "portal-signed-out"
_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int], dict[str, float]]] = {}


def _read(path: Path) -> dict[str, float]:
    """Session id -> when its cookie expires, of the sessions signed out."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (status.st_mtime_ns, status.st_size)
    with _lock:
        kept = _cache.get(path)
        if kept is not None and kept[0] == stamp:
            return kept[1]
    ended = {}
    for line in read_private_file(path).decode().splitlines():
        sid, _, until = line.partition(" ")
        if sid and until:
            ended[sid] = float(until)
    with _lock:
        _cache[path] = (stamp, ended)
    return ended


def end_session(home: Path, sid: str, until: float) -> None:
    """Refuse session ``sid`` from now on (until ``until``, its cookie's expiry)."""
    path = home / NAME
    private_folder(home)
    with open(home / f".{NAME}.lock", "a") as lock:  # one writer at a time, across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        ended = {s: u for s, u in _read(path).items() if u > now} | {sid: until}
        text = "".join(f"{s} {u:.0f}\n" for s, u in ended.items())
        create_private_file(path, text.encode(), replace=True)


def ended(home: Path, sid: str) -> bool:
    return sid in _read(home / NAME)
