"""``calypso portal``: the web portal where visiting users sign in, browse and plot their
data, follow, launch and rerun their runs, and export results (docs/portal.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from calypso.flows.cli.common import port_number
from calypso.settings import load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    portal = commands.add_parser(
        "portal", help="serve the web portal (sign-in, data browser, h5web, runs, export)"
    )
    portal.add_argument("--host", help="address to listen on (default: settings, 127.0.0.1)")
    portal.add_argument("--port", type=port_number, help="port (default: settings, 8400)")
    portal.add_argument("-v", "--verbose", action="store_true", help="log every request")
    portal.set_defaults(handler=command_portal)


def command_portal(args: argparse.Namespace) -> int:
    import uvicorn

    from calypso.flows.portal.app import VIEWER_MISSING, create_app, viewer_built
    from calypso.flows.runtime import check_prefect_api, prepare_environment

    settings = load_settings()
    prepare_environment(settings, verbose=args.verbose)
    # The runs pages read the Prefect API: a server that refuses us is said now, not later.
    check_prefect_api()
    host = args.host or settings.portal.host
    port = args.port or settings.portal.port
    # Where it listens, as the settings say it: the links a launched run's Prefect page
    # gets (without portal.public_url) pointed at the settings' port, not --port.
    portal = settings.portal.model_copy(update={"host": host, "port": port})
    settings = settings.model_copy(update={"portal": portal})
    app = create_app(settings)  # refuses to start without data roots
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "calypso portal: warning: no Prefect API (PREFECT_API_URL): the runs pages read the "
            "`calypso server` that `calypso serve` uses; set PREFECT_API_URL to its API",
            file=sys.stderr,
        )
    if not viewer_built():
        print(f"calypso portal: warning: {VIEWER_MISSING}", file=sys.stderr)
    if not settings.access.ldap.url and not settings.access.oidc.issuer:
        print(
            "calypso portal: warning: no way to sign in: set CALYPSO_ACCESS__LDAP__URL (an "
            "LDAP directory) or CALYPSO_ACCESS__OIDC__ISSUER (OpenID Connect): docs/portal.md",
            file=sys.stderr,
        )
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"calypso portal: warning: listening on {host}: put a TLS reverse proxy in front "
            "(passwords and session cookies would cross the network in clear) and set "
            "portal.secure_cookies = true",
            file=sys.stderr,
        )
    from calypso.registry.access.landlock import describe

    print(f"calypso portal on http://{host}:{port}/", flush=True)
    print(f"calypso portal: {describe()}", flush=True)
    logging.getLogger("uvicorn.access").disabled = not args.verbose
    uvicorn.run(app, host=host, port=port, log_level="info" if args.verbose else "warning")
    return 0
