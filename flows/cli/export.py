"""``calypso export``: copy a processed dataset to object storage."""

from __future__ import annotations

import argparse
import json

from calypso.flows.api import export_processed
from calypso.flows.cli.common import print_export
from calypso.settings import load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="copy a processed dataset to object storage (S3, ...), resumable"
    )
    export.add_argument("source", help="processed dataset folder, or its catalogue id")
    export.add_argument(
        "--to",
        metavar="URI",
        help="s3://bucket/prefix or any fsspec URL or folder (default: under settings' "
        "export.default_target, else <home>/export, the dataset's data-policy path: "
        "<proposal>/<beamline>/<session>/<collection>/<dataset>/<technique>)",
    )
    export.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only files matching this shell pattern (repeatable), e.g. --include=*.h5",
    )
    export.add_argument(
        "--verify", action="store_true", help="read every object back and check its SHA-256"
    )
    export.add_argument("--json", action="store_true", help="print a machine-readable summary")
    export.set_defaults(handler=command_export)


def command_export(args: argparse.Namespace) -> int:
    summary = export_processed(args.source, load_settings(), args.to, args.include, args.verify)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_export(summary)
    return 0
