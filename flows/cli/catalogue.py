"""``calypso catalogue``: the processed datasets, and their delivery to ICAT."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from calypso.errors import ConfigurationError
from calypso.flows.cli.common import count_above_zero, technique_names
from calypso.settings import load_settings

if TYPE_CHECKING:
    from calypso.registry.icat import IcatCatalogue


def add_commands(commands: argparse._SubParsersAction) -> None:
    catalogue = commands.add_parser("catalogue", help="the catalogue of processed datasets")
    catalogue_commands = catalogue.add_subparsers(title="catalogue commands", metavar="ACTION")
    listing = catalogue_commands.add_parser("list", help="list processed datasets")
    listing.add_argument("--technique", choices=technique_names())
    listing.add_argument("--limit", type=count_above_zero, default=50)
    listing.add_argument("--json", action="store_true")
    listing.add_argument(
        "--pending", action="store_true", help="registrations waiting for delivery to ICAT"
    )
    listing.set_defaults(handler=command_catalogue_list)
    flush = catalogue_commands.add_parser(
        "flush", help="deliver pending ICAT registrations and e-logbook posts"
    )
    flush.set_defaults(handler=command_catalogue_flush)
    check = catalogue_commands.add_parser(
        "check", help="is the ICAT broker reachable, its queue consumed, ICAT+ up?"
    )
    check.set_defaults(handler=command_catalogue_check)
    show = catalogue_commands.add_parser("show", help="show one processed dataset")
    show.add_argument("id", type=int)
    show.set_defaults(handler=command_catalogue_show)
    versions = catalogue_commands.add_parser(
        "versions",
        help="every version of a dataset's results, checked against the files it lists",
    )
    versions.add_argument(
        "dataset", help="raw dataset folder (or a processed folder, or a record's id)"
    )
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(handler=command_catalogue_versions)
    prune = catalogue_commands.add_parser(
        "prune", help="remove the files of older versions of a dataset's results"
    )
    prune.add_argument("dataset", help="raw dataset folder (or a processed folder)")
    prune.add_argument(
        "--keep", type=int, default=1, help="latest completed versions kept (default 1)"
    )
    prune.add_argument("--technique", choices=technique_names())
    prune.add_argument(
        "--yes", action="store_true", help="remove them (without it: only say what would go)"
    )
    prune.set_defaults(handler=command_catalogue_prune)


def _icat_catalogue() -> IcatCatalogue:
    from calypso.registry import open_catalogue
    from calypso.registry.icat import IcatCatalogue

    catalogue = open_catalogue(load_settings())
    if not isinstance(catalogue, IcatCatalogue):
        raise ConfigurationError(
            "the catalogue backend is 'sqlite', which delivers nothing: set "
            "CALYPSO_CATALOGUE__BACKEND=icat and CALYPSO_CATALOGUE__ICAT__METADATA_URLS"
        )
    return catalogue


def command_catalogue_flush(args: argparse.Namespace) -> int:
    report = _icat_catalogue().flush(release_stale=True)
    print(
        f"delivered {len(report.delivered)} registration(s) to ICAT; {len(report.pending)} pending"
    )
    if report.posted:
        print(f"posted {len(report.posted)} message(s) and image(s) to the e-logbook")
    if report.error:
        print(f"calypso: error: delivery stopped: {report.error}", file=sys.stderr)
        return 5
    return 0


def command_catalogue_check(args: argparse.Namespace) -> int:
    results = _icat_catalogue().check()
    for component, ok, message in results:
        print(f"{component:9s} {'ok' if ok else 'FAILED':7s} {message}")
    return 0 if all(ok for _, ok, _ in results) else 5


def command_catalogue_list(args: argparse.Namespace) -> int:
    from calypso.registry import open_catalogue

    if args.pending:
        entries = _icat_catalogue().outbox("pending")
        if args.json:
            print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        for entry in [] if args.json else entries:
            what = entry.payload.get("path") or entry.payload.get("metadata_name")
            print(
                f"record {entry.record_id} ({entry.destination}): {what} "
                f"(attempts {entry.attempts}; {entry.last_error or 'not tried'})"
            )
        if not entries and not args.json:
            print("nothing is waiting for ICAT")
        return 0
    records = open_catalogue(load_settings()).list(args.technique, args.limit)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return 0
    if not records:
        print(f"no {args.technique} records" if args.technique else "the catalogue is empty")
        return 0
    print(f"{'id':>5}  {'status':9}  {'technique':12} {'finished':25} raw dataset -> processed")
    for r in records:
        print(
            f"{r.id:>5}  {r.status:9}  {r.technique:12} "
            f"{(r.finished if r.status != 'running' else None) or '':25} "
            f"{r.raw_dataset} -> {r.processed_path}"
        )
    return 0


def command_catalogue_show(args: argparse.Namespace) -> int:
    from calypso.registry import open_catalogue

    catalogue = open_catalogue(load_settings())
    record = catalogue.get(args.id)
    # An ICAT catalogue keeps exports in its local SQLite mirror.
    exports = catalogue.exports(record_id=args.id)
    shown = record.model_dump(mode="json") | {
        "exports": [e.model_dump(mode="json", exclude={"record_id"}) for e in exports]
    }
    print(json.dumps(shown, indent=2))
    return 0


def _versions(dataset: str):
    from calypso.registry import open_catalogue
    from calypso.registry.catalogue import embedded
    from calypso.registry.versions import families, records_of

    catalogue = embedded(open_catalogue(load_settings()))
    if dataset.isdigit() and not Path(dataset).exists():  # a record's id: its dataset's
        dataset = catalogue.get(int(dataset)).raw_dataset
    return catalogue, families(records_of(catalogue, dataset))


def _changed(record, previous) -> str:
    """The parameters that differ from the previous version's, briefly."""
    if previous is None:
        return ""
    changed = [
        f"{name}={record.parameters.get(name)!r}"
        for name in sorted(set(record.parameters) | set(previous.parameters))
        if record.parameters.get(name) != previous.parameters.get(name)
    ]
    return ("; " + ", ".join(changed))[:120] if changed else "; same parameters"


def command_catalogue_versions(args: argparse.Namespace) -> int:
    from calypso.registry.versions import verify

    _, found = _versions(args.dataset)
    if args.json:
        shown = [
            {
                "technique": f.technique,
                "folder": f.folder,
                "file": f.file,
                "versions": [
                    r.model_dump(mode="json", exclude={"checksums"})
                    | {
                        "files": len(r.checksums),
                        "problems": verify(r) if r.status == "completed" else [],
                    }
                    for r in f.records
                ],
            }
            for f in found
        ]
        print(json.dumps(shown, indent=2))
        return 0
    if not found:
        print(f"the catalogue has no results of {args.dataset}")
        return 0
    for family in found:
        print(f"{family.technique} {family.file or ''} in {family.folder}[_vN]")
        previous = None
        for r in family.records:
            state = r.status
            if r.status == "completed":
                problems = verify(r)
                state += f", {len(r.checksums)} files " + (
                    "ok" if not problems else "; ".join(problems)
                )
            print(
                f"  v{r.version or 1:<3} id {r.id:<5} {r.finished or r.started or '':25} "
                f"{state}{_changed(r, previous)}"
            )
            print(f"        {r.processed_path}")
            previous = r if r.status in ("completed", "pruned") else previous
    return 0


def command_catalogue_prune(args: argparse.Namespace) -> int:
    from calypso.flows.dead_runs import reap_dead_runs
    from calypso.registry.versions import prunable, prune

    catalogue, found = _versions(args.dataset)
    if args.keep < 1:
        raise ConfigurationError("--keep must be at least 1: the latest version always stays")
    # Runs that died holding a version (killed: their lease ran out) release it first: a
    # dead publication's files go, and its record says failed (calypso.flows.dead_runs).
    folders = {record.processed_path for family in found for record in family.records}
    dead = reap_dead_runs(load_settings(), folders, dry_run=not args.yes)
    for record in dead:
        print(
            f"{'released' if args.yes else 'would release'} id {record.record_id} of flow run "
            f"{record.flow_run_id}, which died holding {record.folder} (its lease ran out)"
        )
    if dead:
        catalogue, found = _versions(args.dataset)
    chosen = [
        record
        for family in found
        if args.technique in (None, family.technique)
        for record in prunable(family, args.keep)
    ]
    if not found:
        print(f"the catalogue has no results of {args.dataset}: nothing to prune")
        return 0
    if not chosen:
        print(f"nothing to prune: at most {args.keep} completed version(s) of each result")
        return 0
    for record in chosen:
        what = f"v{record.version or 1} (id {record.id}, {record.status}): {record.processed_path}"
        if not args.yes:
            print(f"would remove {len(record.checksums)} files of {what}")
            continue
        removed = prune(catalogue, record)
        print(f"removed {len(removed)} files of {what}")
    if not args.yes:
        print("nothing removed: add --yes to remove them")
    return 0
