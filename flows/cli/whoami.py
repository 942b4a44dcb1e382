"""``calypso whoami``: who Calypso takes you for, and which proposals you may see.

Without options: the Unix account running the command (what ``calypso run``, ``flows``
and ``export`` act as). ``--ldap USER`` and ``--oidc`` sign in as the portal does, to
check a directory or an identity provider's configuration.
"""

from __future__ import annotations

import argparse
import json
import sys

from calypso.settings import load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    whoami = commands.add_parser(
        "whoami", help="who Calypso takes you for, and the proposals you may see"
    )
    how = whoami.add_mutually_exclusive_group()
    how.add_argument("--ldap", metavar="USER", help="sign in through the LDAP directory")
    how.add_argument(
        "--oidc", action="store_true", help="sign in through OpenID Connect (a browser)"
    )
    whoami.add_argument(
        "--password-stdin", action="store_true", help="with --ldap: read the password from stdin"
    )
    whoami.add_argument(
        "--timeout", type=float, default=300, metavar="S", help="with --oidc: wait this long"
    )
    whoami.add_argument("--json", action="store_true", help="print a machine-readable summary")
    whoami.set_defaults(handler=command_whoami)


def command_whoami(args: argparse.Namespace) -> int:
    from calypso.registry.access import current_identity

    settings = load_settings()
    if args.ldap:
        from calypso.registry.access.ldap import ldap_sign_in

        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            import getpass

            password = getpass.getpass(f"LDAP password for {args.ldap}: ")
        identity = ldap_sign_in(args.ldap, password, settings)
    elif args.oidc:
        identity = _oidc_sign_in(settings, args.timeout)
    else:
        identity = current_identity(settings)
    summary = {
        "name": identity.name,
        "verified_by": identity.source,
        "uid": identity.uid,
        "groups": sorted(identity.groups),
        "staff": identity.staff,
        "proposals": "all" if identity.all_proposals else sorted(identity.proposals),
        "because": identity.why,
        "data_roots": [str(root) for root in settings.data_roots],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    uid = f", uid {identity.uid}" if identity.uid is not None else ""
    staff = ", staff" if identity.staff else ""
    print(f"{identity.name} (verified by {identity.source}{uid}{staff})")
    print(f"groups: {', '.join(summary['groups']) or '-'}")
    print(f"proposals: {identity.describe_proposals()} ({identity.why})")
    roots = ", ".join(summary["data_roots"]) or "none (one machine: runs are not confined)"
    print(f"data roots: {roots}")
    return 0


def _oidc_sign_in(settings, timeout: float):
    """The authorization-code flow with a loopback redirect (as command-line tools do):
    print the URL to open, wait for the browser to come back."""
    import http.server
    import threading

    from calypso.registry.access import SignInError
    from calypso.registry.access.oidc import OidcSignIn

    came_back: list[str] = []

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            came_back.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(b"Signed in to Calypso: you may close this page.\n")

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Callback)
    redirect_uri = f"http://127.0.0.1:{server.server_port}/callback"
    sign_in = OidcSignIn(settings)
    pending = sign_in.begin(redirect_uri)
    print(f"open this address to sign in:\n{pending.url}", flush=True)
    server.timeout = timeout
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    thread.join(timeout)
    server.server_close()
    if not came_back:
        raise SignInError(f"no sign-in within {timeout:.0f} s")
    return sign_in.complete(pending, f"{redirect_uri}{came_back[0].removeprefix('/callback')}")
