"""The long-running commands: ``calypso server`` (Prefect and its UI), ``calypso serve``
(a deployment per technique) and ``calypso watch`` (scan events from RAW_DATA trees)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from calypso.errors import ConfigurationError
from calypso.flows.cli.common import port_number, positive_number, technique_names
from calypso.settings import load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser("server", help="start a local Prefect server with its UI")
    server.add_argument("--host", help="address to listen on (default: settings, 127.0.0.1)")
    server.add_argument("--port", type=port_number, help="port (default: settings, 4200)")
    server.add_argument(
        "--init",
        action="store_true",
        help="only make the Prefect API's secret and Dask's certificate in Calypso's home, "
        "then exit: for services that start separately (deploy/compose.yaml)",
    )
    server.set_defaults(handler=command_server)

    serve = commands.add_parser(
        "serve", help="serve one Prefect deployment per technique, triggered by acquisitions"
    )
    serve.add_argument(
        "--technique",
        action="append",
        choices=technique_names(),
        dest="techniques",
        help="serve only this technique (repeatable; default: all)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    serve.set_defaults(handler=command_serve)

    watch = commands.add_parser(
        "watch", help="follow RAW_DATA trees and announce every finished scan to Prefect"
    )
    watch.add_argument("roots", nargs="+", metavar="ROOT", help="e.g. /data/visitor")
    watch.add_argument("--once", action="store_true", help="one pass, then exit")
    watch.add_argument(
        "--interval", type=positive_number, metavar="S", help="seconds between polls"
    )
    watch.add_argument(
        "--blissdata",
        metavar="URL",
        help="also follow scan starts on Bliss's data-stream server (redis://host:port): a "
        "scan a rule gives to diffraction or MX starts its live run in `calypso serve` at "
        "once (default: settings, watch.blissdata_url; a password is better kept there)",
    )
    watch.set_defaults(handler=command_watch)

    deployments = commands.add_parser(
        "deployments",
        help="print deploy/prefect.yaml as the technique descriptors make it (for work pools)",
    )
    what = deployments.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help="renew deploy/prefect.yaml")
    what.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    deployments.set_defaults(handler=command_deployments)


def _require_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, or an address not this machine's, before
    the server is announced (uvicorn would say so after, amid a traceback)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): another server uses the "
            "port, or the address is not this machine's; give --port / --host"
        ) from None


def command_server(args: argparse.Namespace) -> int:
    from calypso.executors.tls import certificate_path, ensure_certificate
    from calypso.flows import prefect_database, prefect_server
    from calypso.flows.runtime import AUTH, SERVER_AUTH, prefect_auth_path, prefect_auth_string

    settings = load_settings()
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    env = dict(os.environ)
    env.pop(prefect_server.PARENT, None)  # nobody's to follow: it stays when its shell goes
    # The API and UI ask for this secret (HTTP basic): one the operator gives wins over
    # the one Calypso keeps in its home (made on the first start).
    secret = env.get(SERVER_AUTH) or prefect_auth_string(settings)
    where = SERVER_AUTH if env.get(SERVER_AUTH) else prefect_auth_path(settings)
    if args.init:
        made = [f"Prefect API secret: {where}"]
        if settings.executor.tls:
            made.append(f"Dask certificate: {ensure_certificate(certificate_path(settings.home))}")
        print("; ".join(made))
        return 0
    env[SERVER_AUTH] = secret
    env[AUTH] = secret  # the server's own services call its API too
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A run of a deployment at its concurrency limit is put back for this long before it
    # asks again (Prefect's default, 30 s, leaves a burst of acquisitions idle between
    # waves): asking every 2 s costs the server one small request per waiting run.
    env.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
    env.setdefault("PREFECT_UI_API_URL", f"http://{host}:{port}/api")
    # What `prefect server start` runs, through Calypso's application: a busy database's
    # 503 says to ask again soon (flows/prefect_server.py), as for the local server.
    level = env.get("PREFECT_SERVER_LOGGING_LEVEL", "warning").lower()
    command = prefect_server.serve_command(host, port, level)
    _require_free(host, port)
    print(
        f"Prefect server and UI on http://{host}:{port} (Ctrl-C stops it), closed: the UI and "
        f"the API ask for the secret in {where}.\nCalypso's commands with this home send it; "
        f"point them at the server with\n  export PREFECT_API_URL=http://{host}:{port}/api",
        flush=True,
    )
    if not _loopback(host):
        print(
            f"Listening on {host}, beyond this machine: put a TLS reverse proxy in front, or the "
            "secret crosses the network in clear (docs/security.md).",
            flush=True,
        )
    prefect_database.provide_configured()  # a new home's database
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def command_serve(args: argparse.Namespace) -> int:
    from calypso.flows.online.serve import serve
    from calypso.flows.runtime import prepare_environment

    settings = load_settings()
    prepare_environment(settings, verbose=args.verbose)
    # Flow runs log to the Prefect UI; this console says what serve itself does.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    _log_to_stderr()
    serve(settings, args.techniques)
    return 0


def command_watch(args: argparse.Namespace) -> int:
    from calypso.flows.online.watch import Watcher
    from calypso.flows.runtime import check_prefect_api, prepare_environment

    settings = load_settings()
    if args.interval:
        settings = settings.model_copy(
            update={"watch": settings.watch.model_copy(update={"interval_s": args.interval})}
        )
    if args.blissdata:
        from calypso.settings import WatchSettings

        if not args.blissdata.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("--blissdata takes a Redis URL: redis://host:port")
        # validated as the setting is: a password in it is never logged
        watch = settings.watch.model_dump() | {"blissdata_url": args.blissdata}
        settings = settings.model_copy(update={"watch": WatchSettings.model_validate(watch)})
    check_rules(settings.watch.beamlines)
    prepare_environment(settings)
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ConfigurationError(
            "calypso watch posts events to a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api, where `calypso server` listens)"
        )
    check_prefect_api()
    roots = [Path(root).absolute() for root in args.roots]
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing:
        raise ConfigurationError(f"cannot watch {', '.join(missing)}: not a folder")
    if not settings.watch.beamlines:
        raise ConfigurationError(
            "no beamline rules: set CALYPSO_WATCH__BEAMLINES (or [watch.beamlines] in the "
            "config file) to say which technique reduces which scans "
            "(docs/operations/automation.md)"
        )
    _log_to_stderr()
    from calypso.executors.interrupts import StopRequest

    with StopRequest() as stop:  # taken between two looks, as `calypso serve` does
        try:
            Watcher(roots, settings, api).run(once=args.once, stop=stop)
        except KeyboardInterrupt:
            logging.getLogger("calypso.watch").info(
                "interrupted: watch stops (what it announced is in its state)"
            )
    return 0


def check_rules(beamlines: dict[str, list]) -> None:
    """Refuse, before anything is watched, a rule naming no technique or a parameter the
    technique does not take: otherwise each dataset it matches is rejected (or each run
    fails) in turn, said only in the watcher's log."""
    import difflib

    from calypso.flows.api import unknown_parameters
    from calypso.flows.techniques import TECHNIQUES

    problems = []
    for beamline, rules in beamlines.items():
        for number, rule in enumerate(rules):
            where = f"watch.beamlines.{beamline}[{number}]"
            if rule.technique.startswith("flow:"):  # a saved flow: looked up as it runs
                continue
            if rule.technique not in TECHNIQUES:
                close = difflib.get_close_matches(rule.technique, TECHNIQUES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(
                    f"{where}.technique {rule.technique!r} is no technique ({hint}known: "
                    f"{', '.join(TECHNIQUES)}, or flow:NAME for a saved flow)"
                )
            elif unknown := unknown_parameters(rule.technique, rule.parameters):
                problems.append(f"{where}.parameters: {unknown}")
    if problems:
        raise ConfigurationError("; ".join(problems))


def _log_to_stderr() -> None:
    """Calypso's own log records on standard error: these commands run for hours, unattended."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    calypso_logger = logging.getLogger("calypso")
    calypso_logger.addHandler(handler)
    calypso_logger.setLevel(logging.INFO)
    calypso_logger.propagate = False  # Prefect's console handler would print it again


def command_deployments(args: argparse.Namespace) -> int:
    from calypso.flows.deployments import FILE, prefect_yaml

    text = prefect_yaml()
    if args.write:
        FILE.write_text(text)
        print(f"wrote {FILE}")
    elif args.check:
        if not FILE.is_file() or FILE.read_text() != text:
            print(f"{FILE} is not current: renew it with `calypso deployments --write`")
            return 1
        print(f"{FILE} is current")
    else:
        print(text, end="")
    return 0
