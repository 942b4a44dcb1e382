"""What several command groups share: the technique choices, settings with ``--workers``,
and how run and export summaries are printed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from calypso.flows.techniques import TECHNIQUES


def technique_names() -> tuple[str, ...]:
    """The ``choices`` of every TECHNIQUE argument, read when the parser is built."""
    return tuple(TECHNIQUES)


def print_summary(summary: dict[str, Any]) -> None:
    timings = summary["timings_s"]
    unit = summary["unit"]
    print(
        f"{summary['technique']}: {summary['count']} {unit} in {summary['tasks']} tasks, "
        f"flow {timings['total']:.1f} s ({summary['per_s']:.1f} {unit}/s), "
        f"command {summary['wall_s']:.1f} s"
    )
    print(f"results in {summary['processed_dataset_dir']}")
    for url in summary["outputs"]:
        print(f"  {url}")
    print(
        f"catalogue id {summary['catalogue_id']} (calypso catalogue show {summary['catalogue_id']})"
    )
    if summary.get("export"):
        print_export(summary["export"])
    for warning in summary.get("warnings", []):
        print(f"calypso: warning: {warning}", file=sys.stderr)


def print_export(export: dict[str, Any]) -> None:
    print(
        f"exported {export['files']} files ({export['bytes'] / 2**20:.1f} MiB) to "
        f"{export['uri']}: {export['uploaded']} sent, {export['already_there']} already there"
        f" ({export['megabytes_per_s']:.1f} MiB/s){', verified' if export['verified'] else ''}"
    )
    print(f"manifest: {export['manifest']}")
    for warning in export.get("warnings", []):
        print(f"calypso: warning: {warning}", file=sys.stderr)


def port_number(text: str) -> int:
    """argparse type of a TCP port: 1-65535 (the socket library refuses others with a
    traceback once the server has begun)."""
    port = _number(text, int)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def positive_number(text: str) -> float:
    """argparse type of a duration that must be above zero."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def live_source(text: str) -> str:
    """argparse type of ``--live``: ``files``, or a blissdata server's URL."""
    if text == "files" or text.partition("://")[0] in ("redis", "rediss", "unix"):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: give 'files' (the growing files) or Bliss's data-stream server "
        "(redis://host:port, rediss://host:port or unix:///path)"
    )


def count_above_zero(text: str) -> int:
    """argparse type of a count that must be above zero."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number" if kind is int else f"{text!r} is not a number"
        ) from None
