"""``calypso parameters``: what a technique's parameters are, and their defaults."""

from __future__ import annotations

import argparse
import json

from calypso.flows.api import parameter_model
from calypso.flows.cli.common import technique_names


def add_commands(commands: argparse._SubParsersAction) -> None:
    params = commands.add_parser("parameters", help="list a technique's parameters")
    params.add_argument("technique", choices=technique_names())
    params.add_argument("--json", action="store_true", help="print the JSON schema")
    params.set_defaults(handler=command_parameters)


def command_parameters(args: argparse.Namespace) -> int:
    model = parameter_model(args.technique)
    if args.json:
        print(json.dumps(model.model_json_schema(), indent=2))
        return 0
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        print(f"{name:22s} default={default!r}\n    {field.description or ''}")
    return 0
