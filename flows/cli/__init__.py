"""The ``calypso`` command line.

Each module registers one group of commands (``add_commands(subparsers)``) and holds their
handlers; the work itself is done by :mod:`calypso.flows.api` and the flows.

Every error Calypso anticipates is a :class:`~calypso.errors.CalypsoError`:
the CLI prints its message (no traceback) and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from typing import NoReturn

import calypso
from calypso.errors import CalypsoError, is_ctrl_c
from calypso.flows.startup import collect_later

# In the order `calypso --help` lists the commands (modules of this package).
COMMAND_GROUPS = (
    *("run", "export", "parameters", "sample_data", "service", "user_flows", "cluster"),
    *("catalogue", "automations", "whoami", "config", "portal"),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Machine-readable errors too when the caller asked for machine-readable output.
    as_json = "--json" in argv
    try:  # a Ctrl-C from the first moment on is `interrupted`, not a traceback
        # `calypso run` alone imports only its own group: a run handed to `calypso serve`
        # starts without the other groups' imports (the settings' among them).
        parser = build_parser(("run",) if argv[:1] == ["run"] else COMMAND_GROUPS)
        import argcomplete  # completes words when the shell asks (`calypso completion`)

        argcomplete.autocomplete(parser)
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except CalypsoError as exc:
        return _report(exc, as_json)
    except KeyboardInterrupt:
        return _report(Interrupted("interrupted"), as_json)
    except BrokenPipeError:  # output piped into `head` or a pager that quit
        sys.stderr.close()
        return 0
    except Exception as exc:
        if is_ctrl_c(exc):  # wrapped by a library: a Ctrl-C all the same, not a traceback
            return _report(Interrupted("interrupted"), as_json)
        raise


def command() -> NoReturn:
    """The ``calypso`` command: :func:`main`, then :func:`exit_now`. Python's garbage
    collector is off while the command imports (:mod:`calypso.flows.startup`)."""
    collect_later()
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process with status ``code`` once what an exit owes is done, as Python does
    it: the threads that are not daemons joined, the ``atexit`` handlers run (Prefect's log
    and event workers drain there, logging flushes), the output flushed. Then the process
    ends without tearing its modules down one by one: after Prefect, Dask, scipy and
    matplotlib are imported that alone takes 0.4-0.8 s (one spectrum with the kept local
    server: 2.41 s against 2.93 s). Files are closed by then (every writer closes its
    own); what is skipped is freeing memory the process is about to give back anyway."""
    import atexit
    import os
    import threading
    from contextlib import suppress

    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's first step at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed, or a pipe whose reader has gone
            stream.flush()
    os._exit(code)


class Interrupted(CalypsoError):
    exit_code = 130


class UsageError(CalypsoError):
    """The command line itself is wrong (argparse's errors, exit status 2)."""

    exit_code = 2

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


def _report(exc: CalypsoError, as_json: bool) -> int:
    if as_json:
        error = {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}
        print(json.dumps({"error": error}, indent=2))
    else:
        print(getattr(exc, "usage", "") + f"calypso: error: {exc}", file=sys.stderr)
    return exc.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors raised, so that ``--json`` can report them as JSON."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)", usage=self.format_usage())


def build_parser(groups: tuple[str, ...] = COMMAND_GROUPS) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="calypso", description="Synchrotron data reduction flows (Prefect + Dask)."
    )
    parser.add_argument("--version", action="version", version=f"calypso {calypso.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in groups:
        import_module(f"{__name__}.{group}").add_commands(commands)
    completion = commands.add_parser(
        "completion",
        help="print the shell code that completes calypso's commands",
        description='Completion for bash or zsh: add `eval "$(calypso completion bash)"` '
        "to ~/.bashrc (or `... zsh` to ~/.zshrc).",
    )
    completion.add_argument("shell", choices=("bash", "zsh", "fish", "tcsh"))
    completion.set_defaults(handler=_print_completion)
    return parser


def _print_completion(args: argparse.Namespace) -> int:
    from argcomplete import shellcode

    print(shellcode(["calypso"], shell=args.shell))
    return 0
