"""``calypso run``: reduce a raw dataset with a technique's flow."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.flows.api import (
    build_parameters,
    load_settings_with_workers,
    parameter_values,
    run_technique,
)
from calypso.flows.cli.common import (
    live_source,
    positive_number,
    print_summary,
    technique_names,
)
from calypso.flows.online.submissions import configured_socket, run_by_service, service_socket

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="reduce a raw dataset with a technique flow")
    run.add_argument("technique", choices=technique_names())
    run.add_argument("input", help="raw dataset folder (ESRF layout), Bliss file or image file(s)")
    run.add_argument(
        "--scan",
        type=int,
        action="append",
        dest="scans",
        metavar="N",
        help="scan number to reduce (repeatable; default: every scan)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a parameter (see `calypso parameters TECHNIQUE`)",
    )
    run.add_argument("--params", metavar="FILE", help="parameters from a JSON or YAML file")
    run.add_argument(
        "--output",
        metavar="DIR",
        help="output folder (default: the dataset's PROCESSED_DATA folder)",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local Dask worker processes (default: one per core)",
    )
    run.add_argument(
        "--export-to",
        metavar="URI",
        help="then export the results under this prefix (s3://bucket/prefix, a folder ...)",
    )
    run.add_argument(
        "--local",
        action="store_true",
        help="run in this command's own processes even when `calypso serve` is running",
    )
    run.add_argument(
        "--live",
        metavar="SOURCE",
        type=live_source,
        help="reduce the scan while it runs, following it on Bliss's data-stream server "
        "(redis://host:port) or through its growing files ('files'): docs/live.md",
    )
    run.add_argument(
        "--stall-timeout",
        type=positive_number,
        default=60.0,
        metavar="S",
        help="with --live: the writer stopped when no frame came for S seconds",
    )
    run.add_argument("--json", action="store_true", help="print a machine-readable summary")
    run.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    run.set_defaults(handler=command_run)


def command_run(args: argparse.Namespace) -> int:
    # Handed to a running service first, before this command reads (and imports) its own
    # settings: the service's decide how a submitted run is done. The settings are asked
    # where the service listens only when the variables and the file do not say plainly.
    submit = not (args.live or args.local or args.workers)
    where = configured_socket() if submit else None
    summary = submitted(args, where) if where is not None else None
    if summary is not None:
        return _report(args, summary)
    settings = load_settings_with_workers(args.workers)
    if args.live:
        summary = live_run(args, settings)
    elif submit and where is None:
        summary = submitted(args, service_socket(settings))
    if summary is None:
        # Imported here: Prefect's import is slow and `calypso --help` needs none of it.
        from calypso.flows.prefect_api import begin_prefect_api
        from calypso.flows.runtime import prepare_environment

        prepare_environment(settings, verbose=args.verbose)
        # Prefect's server, when this command starts one, starts while the command checks
        # its parameters and input, imports Prefect and Dask and makes its plan.
        with begin_prefect_api(settings) as api:
            parameters = build_parameters(args.technique, args.set, args.params)
            summary = run_technique(
                args.technique,
                args.input,
                parameters,
                args.scans,
                args.output,
                settings,
                export_to=args.export_to,
                api=api,
            )
    return _report(args, summary)


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def live_run(args: argparse.Namespace, settings: CalypsoSettings) -> dict[str, Any]:
    """The run following the scan as it is written (``--live``), in this command's processes."""
    from calypso.flows.runtime import prepare_environment

    prepare_environment(settings, verbose=args.verbose)  # before Prefect reads its settings
    from calypso.flows.online.live import run_live

    parameters = build_parameters(args.technique, args.set, args.params)
    live = {"source": args.live, "stall_timeout": args.stall_timeout}
    return run_live(
        args.technique, args.input, parameters, args.scans, args.output, settings,
        live=live, export_to=args.export_to,
    )  # fmt: skip


def submitted(args: argparse.Namespace, where: Path | None) -> dict[str, Any] | None:
    """The run done by the service listening on ``where``, or None when none listens."""
    return run_by_service(
        where,
        args.technique,
        args.input,
        lambda: parameter_values(args.technique, args.set, args.params),
        args.scans,
        args.output,
        args.export_to,
        f" in {args.params}" if args.params else "",
    )
