"""What tests that run Calypso's services as processes share: stopping them, waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start(arguments: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``calypso ARGUMENTS`` as a process in its own session, its output appended to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", *arguments],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run(arguments: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``calypso ARGUMENTS`` to its end, its output and errors captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "calypso.flows.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with ``start_new_session=True`` and its children; killed
    after 30 s if ``sig`` did not end it."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    """``condition()``'s first true value, polled every ``interval`` s for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
