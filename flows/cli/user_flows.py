"""``calypso flows``: user flows, from writing a specification to running a saved version."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import TYPE_CHECKING

from calypso.errors import ParameterError
from calypso.flows.api import (
    current_identity,
    get_saved_flow,
    load_settings_with_workers,
    run_saved_flow,
    saved_flows,
)
from calypso.flows.cli.common import technique_names
from calypso.settings import CalypsoSettings, load_settings

if TYPE_CHECKING:
    from calypso.registry.saved_flows import SavedFlow


def add_commands(commands: argparse._SubParsersAction) -> None:
    flows = commands.add_parser("flows", help="user flows: check, save, list, show, diff, run")
    flow_commands = flows.add_subparsers(title="flow commands", metavar="ACTION")
    tasks = flow_commands.add_parser("tasks", help="the steps a user flow may use")
    tasks.set_defaults(handler=command_flows_tasks)
    export_flow = flow_commands.add_parser("export", help="a built-in flow as a specification")
    export_flow.add_argument("technique", choices=technique_names())
    export_flow.set_defaults(handler=command_flows_export)
    check_flow = flow_commands.add_parser("check", help="check a specification file")
    check_flow.add_argument("file")
    check_flow.set_defaults(handler=command_flows_check)
    save = flow_commands.add_parser("save", help="store a new version of a flow")
    save.add_argument("file")
    save.add_argument("--name", required=True)
    save.add_argument("--proposal", help="the proposal it belongs to (its data only)")
    save.add_argument("--description", default="")
    save.set_defaults(handler=command_flows_save)
    listing_flows = flow_commands.add_parser("list", help="saved flows and their versions")
    listing_flows.set_defaults(handler=command_flows_list)
    show_flow = flow_commands.add_parser("show", help="a saved flow's specification")
    show_flow.add_argument("reference", metavar="NAME[@VERSION]")
    show_flow.set_defaults(handler=command_flows_show)
    diff = flow_commands.add_parser("diff", help="what changed between two versions")
    diff.add_argument("first", metavar="NAME@V1")
    diff.add_argument("second", metavar="NAME@V2")
    diff.set_defaults(handler=command_flows_diff)
    run_flow = flow_commands.add_parser("run", help="run a saved flow on a raw dataset")
    run_flow.add_argument("reference", metavar="NAME[@VERSION]")
    run_flow.add_argument("input", help="raw dataset folder (inside the flow's proposal)")
    run_flow.add_argument("--scan", type=int, action="append", dest="scans", metavar="N")
    run_flow.add_argument("--output", metavar="DIR", help="inside the proposal")
    run_flow.add_argument("--workers", type=int, metavar="N")
    run_flow.add_argument("--json", action="store_true")
    run_flow.set_defaults(handler=command_flows_run)
    delete = flow_commands.add_parser("delete", help="delete a saved flow (every version)")
    delete.add_argument("name")
    delete.set_defaults(handler=command_flows_delete)


def _read_specification(path: str) -> str:
    """The file's text, read no further than one byte past the size limit (a huge file is
    refused by the check without being read whole)."""
    limit = load_settings().user_flows.max_document_bytes
    try:
        with open(path, "rb") as file:
            return file.read(limit + 1).decode("utf-8", errors="replace")
    except OSError as exc:
        raise ParameterError(f"cannot read the flow specification {path}: {exc}") from None


def command_flows_tasks(args: argparse.Namespace) -> int:
    from calypso.flows.techniques import all_steps

    for step in all_steps().values():
        inputs = ", ".join(f"{port}: {kind}" for port, kind in step.inputs.items()) or "-"
        parameters = f" + {step.technique} parameters" if step.takes_parameters else ""
        print(f"{step.name:30s} ({inputs}{parameters}) -> {step.output}\n    {step.description}")
    return 0


def command_flows_export(args: argparse.Namespace) -> int:
    from calypso.flows.specification import export_specification

    print(export_specification(args.technique), end="")
    return 0


def command_flows_check(args: argparse.Namespace) -> int:
    from calypso.flows.specification import check_specification

    spec = check_specification(_read_specification(args.file), args.file)
    variants = len(spec.variants()) if spec.sweep else 1
    print(f"{args.file}: valid {spec.technique} flow, steps {' -> '.join(spec.order)}", end="")
    print(f"; sweep of {variants} variants" if spec.sweep else "")
    return 0


def command_flows_save(args: argparse.Namespace) -> int:
    from calypso.flows.specification import check_specification

    text = _read_specification(args.file)
    spec = check_specification(text, args.file)
    settings = load_settings()
    identity = current_identity(settings)
    if settings.data_roots and args.proposal is None and not identity.staff:
        # A flow of no proposal runs on any proposal's data its caller may touch: a name
        # a staff watch rule waits for could be taken by anyone who saves it first.
        raise ParameterError(
            "give the flow's proposal (--proposal ID, one of yours: "
            f"{identity.describe_proposals()}): a flow is saved for one proposal and runs "
            "on its data"
        )
    saved = saved_flows(settings).save(
        args.name, text, spec.technique, identity, args.proposal, args.description
    )
    print(
        f"saved {saved.label} ({saved.technique}, owner {saved.owner}, proposal {saved.proposal}, "
        f"sha256 {saved.sha256[:12]})"
    )
    return 0


def _visible(reference: str, settings: CalypsoSettings) -> SavedFlow:
    """A saved flow the caller may see (their own, or their proposals'); another's is
    "no saved flow", as if it were not there."""
    from calypso.errors import CatalogueError
    from calypso.registry.saved_flows import may_change

    flow = get_saved_flow(reference, settings)
    if not may_change(current_identity(settings), flow):
        raise CatalogueError(f"no saved flow {reference} (`calypso flows list`)")
    return flow


def command_flows_list(args: argparse.Namespace) -> int:
    from calypso.registry.saved_flows import may_change

    settings = load_settings()
    identity = current_identity(settings)
    flows = [f for f in saved_flows(settings).list() if may_change(identity, f)]
    if not flows:
        print("no saved flows (`calypso flows save FILE --name NAME`)")
    for flow in flows:
        sha = (flow.sha256 or "")[:12] if flow.intact else "ALTERED"
        print(
            f"{flow.label:24s} {flow.technique:12s} {flow.owner:10s} {flow.proposal or '-':8s} "
            f"{sha:12s} {flow.created}  {flow.description}"
        )
    return 0


def command_flows_show(args: argparse.Namespace) -> int:
    flow = _visible(args.reference, load_settings())
    print(
        f"# {flow.label}: {flow.technique}, owner {flow.owner}, proposal {flow.proposal}, "
        f"saved {flow.created} with Calypso {flow.calypso_version}, sha256 {flow.sha256}\n"
        f"# {flow.description}"
    )
    print(flow.specification, end="")
    return 0


def command_flows_diff(args: argparse.Namespace) -> int:
    settings = load_settings()
    first = _visible(args.first, settings)
    second = _visible(args.second, settings)
    lines = list(
        difflib.unified_diff(
            first.specification.splitlines(keepends=True),
            second.specification.splitlines(keepends=True),
            fromfile=first.label,
            tofile=second.label,
        )
    )
    sys.stdout.writelines(lines)
    if first.description != second.description:  # saved beside the specification
        print(f"description: {first.description!r} -> {second.description!r}")
    elif not lines:  # said, not an empty output that looks like a failure
        print(f"{first.label} and {second.label} are the same flow")
    return 0


def command_flows_delete(args: argparse.Namespace) -> int:
    settings = load_settings()
    count = saved_flows(settings).delete(args.name, current_identity(settings))
    print(f"deleted {args.name} ({count} versions; kept for the provenance of results)")
    return 0


def command_flows_run(args: argparse.Namespace) -> int:
    from calypso.flows.runtime import prepare_environment

    settings = load_settings_with_workers(args.workers)
    prepare_environment(settings)
    flow = get_saved_flow(args.reference, settings)
    result = run_saved_flow(flow, args.input, args.scans, args.output, settings)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    for variant in result["variants"]:
        sweep = ", ".join(f"{k}={v}" for k, v in variant.get("sweep", {}).items())
        print(
            f"{flow.label}{' [' + sweep + ']' if sweep else ''}: {variant['processed_dataset_dir']}"
        )
        for url in variant["outputs"]:
            print(f"  {url}")
    return 0
