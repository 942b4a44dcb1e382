"""The ``calypso`` command line.

Each module registers one group of commands (``add_commands(subparsers)``) and holds their
handlers; the work itself is done by :mod:`calypso.flows.api` and the flows.

Every error Calypso anticipates is a :class:`~calypso.errors.CalypsoError`:
the CLI prints its message (no traceback) and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys

from calypso.errors import CalypsoError
from calypso.flows.cli import (
    catalogue,
    cluster,
    export,
    parameters,
    run,
    sample_data,
    service,
    user_flows,
)

# In the order `calypso --help` lists the commands.
COMMAND_GROUPS = (run, export, parameters, sample_data, service, user_flows, cluster, catalogue)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CalypsoError as exc:
        print(f"calypso: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("calypso: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` or a pager that quit
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calypso", description="Synchrotron data reduction flows (Prefect + Dask)."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser
