"""Runs submitted to a running ``calypso serve``: the warm service (issue #18).

A command started from nothing pays Python's imports of Prefect, pyFAI and Dask in
three processes, a Dask cluster, and often a temporary Prefect server: seconds before
the first frame. ``calypso serve`` has all of these already: its Dask workers (with
their integrator caches), its Prefect client, the techniques' modules. So it listens
on a Unix socket (``serve.socket``, default ``<home>/serve.sock``); ``calypso run``
and ``calypso.run`` send their run there when it answers, and follow it as before
(stages, progress bar, summary, ``--json``, exit codes). Without a service they run
alone, as always.

Who is asking is the kernel's word, not the request's: the service reads the peer's
uid from the socket (``SO_PEERCRED``), and the run is checked against that account's
proposals exactly as if the user had run it (:func:`calypso.flows.api.run_technique`
with :func:`calypso.registry.access.unix_identity` of that uid). A socket file is
reached through the file system, so its folder's permissions decide who may connect
at all. The command checks the other way too: the process listening must be root, the
user, or the owner of the socket's folder (in a folder others can write, another
account could listen in the service's place and read the requests).

The conversation is one JSON document a line. The command sends one request::

    {"technique": ..., "input": ..., "values": {...}, "scans": ..., "output": ...,
     "export_to": ..., "cwd": ..., "source": ...}

and reads ``{"accepted": true}`` at once (within ``ACKNOWLEDGE_S``: else the service is
frozen), ``{"stage": TEXT}``, ``{"progress": [DONE, TOTAL]}`` lines, then one
``{"summary": {...}}`` or ``{"error": {"type", "message", "exit_code"}}``. A command
that goes away (Ctrl-C) leaves its run going: it is followed in the Prefect UI.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import CalypsoError, ConfigurationError

if TYPE_CHECKING:
    import socketserver

    from calypso.flows.progress_bar import Progress
    from calypso.settings import CalypsoSettings

logger = logging.getLogger("calypso.serve")

# The longest request line accepted: parameters are small; a file's content is not sent.
MAX_REQUEST_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 1.0
ACKNOWLEDGE_S = 30.0  # from a request to the service's acknowledgement
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last a NUL


def socket_path(settings: CalypsoSettings) -> Path:
    """Where ``calypso serve`` listens for submitted runs."""
    return settings.serve.socket or settings.home / "serve.sock"


# -- the command's side ------------------------------------------------------------


class ServiceGone(CalypsoError):
    """The service stopped answering in the middle of a run."""


def service_socket(settings: CalypsoSettings) -> Path | None:
    """Where ``calypso run`` looks for the service; None when it never submits runs."""
    return socket_path(settings) if settings.serve.submit_runs else None


# pydantic's words for a boolean's text, which the settings accept (any case).
_TRUE, _FALSE = {"1", "on", "t", "true", "y", "yes"}, {"0", "off", "f", "false", "n", "no"}


def configured_socket() -> Path | None:
    """:func:`service_socket` told from the ``CALYPSO_*`` variables and the configuration
    file alone, without loading (and importing) the settings: a command hands its run to
    the service ~0.25 s sooner. None when they do not tell it plainly (the nested
    ``CALYPSO_SERVE`` JSON, a value that is not what the settings accept: the settings
    decide, and report the mistake) or when runs are not submitted."""
    environment = {name.upper(): value for name, value in os.environ.items()}
    if "CALYPSO_SERVE" in environment:
        return None
    from calypso.config_file import DEFAULT_HOME, read_config_file

    config = read_config_file()
    serve = config.get("serve", {})
    submit = environment.get("CALYPSO_SERVE__SUBMIT_RUNS", serve.get("submit_runs", True))
    if isinstance(submit, str):
        submit = True if submit.lower() in _TRUE else False if submit.lower() in _FALSE else None
    if submit is not True:
        return None
    named = environment.get("CALYPSO_SERVE__SOCKET", serve.get("socket"))
    home = environment.get("CALYPSO_HOME", config.get("home"))
    if named is not None:
        return Path(named) if isinstance(named, str) and named else None
    if home is None:
        return DEFAULT_HOME / "serve.sock"
    return Path(home) / "serve.sock" if isinstance(home, str) and home else None


def connect(path: Path | None) -> socket.socket | None:
    """A connection to the service listening on ``path``, or None when none is running
    (no socket, or a socket left by a service that stopped)."""
    if path is None or not path.exists():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(CONNECT_TIMEOUT_S)
    try:
        connection.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        connection.close()
        return None  # a stale socket: nobody listens
    except OSError as exc:
        connection.close()
        raise ConfigurationError(
            f"cannot reach the Calypso service at {path} ({exc.strerror or exc}): ask its "
            "operator, or run here with --local"
        ) from None
    listener = peer_uid(connection)
    trusted = {0, os.getuid(), _owner(path.parent)}
    if listener not in trusted:
        connection.close()
        raise ConfigurationError(
            f"the socket {path} is served by uid {listener}, who owns neither it nor its "
            "folder: another account may be listening in the service's place (a folder "
            "others can write?); not sending it your run: put the service's socket in a "
            "folder of the service's own (CALYPSO_SERVE__SOCKET), or run here with --local"
        )
    connection.settimeout(None)  # a run takes as long as it takes
    return connection


def _owner(folder: Path) -> int:
    try:
        return folder.stat().st_uid
    except OSError:
        return -1


def run_by_service(
    where: Path | None,
    technique: str,
    raw: str,
    values: Callable[[], dict[str, Any]],
    scans: list[int] | None,
    output: str | None,
    export_to: str | None,
    source: str,
) -> dict[str, Any] | None:
    """The summary of the run done by the running service (``calypso serve``), followed on
    a progress bar here; None when no service listens on ``where`` (see
    :func:`service_socket`). ``values()`` gives the parameters' values (a relative file
    among them means this process's folder)."""
    from calypso.flows.progress_bar import progress_bar
    from calypso.flows.techniques import TECHNIQUES

    connection = connect(where)
    if connection is None:
        return None
    request = {
        "technique": technique,
        "input": os.path.abspath(raw),  # paths made absolute here, where they mean something
        "values": values(),
        "scans": scans,
        "output": os.path.abspath(output) if output else None,
        "export_to": export_to,
        "cwd": os.getcwd(),
        "source": source,
    }
    bar = progress_bar(TECHNIQUES[technique].unit, "sent to calypso serve")
    try:
        return submit(connection, request, bar)
    finally:
        bar.close()


def submit(
    connection: socket.socket, request: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Send ``request`` to the service, report what it says to ``progress``, and return the
    run's summary (raising the run's error as the same kind of error, same exit code)."""
    where = connection.getpeername()  # asked now: the socket is closed below
    # A service acknowledges a request at once; one that does not is frozen, not busy.
    connection.settimeout(ACKNOWLEDGE_S)
    with connection, connection.makefile("rwb") as stream:
        stream.write(json.dumps(request).encode() + b"\n")
        stream.flush()
        for line in _lines(stream, where):
            reply = json.loads(line)
            if "accepted" in reply:
                connection.settimeout(None)  # a run takes as long as it takes
            elif "progress" in reply:
                progress.update_to(*reply["progress"])
            elif "stage" in reply:
                progress.stage(reply["stage"], started=reply.get("started", False))
            elif "summary" in reply:
                return reply["summary"]
            elif "error" in reply:
                raise _error_from(reply["error"])
    raise ServiceGone(
        f"the Calypso service at {where or 'its socket'} stopped during "
        "the run: see its log; the run may be in the Prefect UI"
    )


def _lines(stream: Any, where: Any) -> Any:
    try:
        yield from stream
    except TimeoutError:
        raise ServiceGone(
            f"the Calypso service at {where or 'its socket'} took the run but did not answer "
            f"within {ACKNOWLEDGE_S:.0f} s: it is frozen or overloaded; see its log, or run "
            "here with --local"
        ) from None


def _error_from(error: dict[str, Any]) -> CalypsoError:
    from calypso import errors
    from calypso.registry.access import errors as access_errors

    kind = getattr(errors, error["type"], None) or getattr(access_errors, error["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, CalypsoError)):
        kind = CalypsoError
    message = error["message"]
    if issubclass(kind, access_errors.AccessError):  # the service's rules, not this machine's
        message += (
            " (said by `calypso serve`, which took the run: it reads only inside its data "
            "roots and your proposals; --local runs it in this command)"
        )
    exc = kind(message)
    exc.exit_code = int(error.get("exit_code", 1))
    return exc


# -- the service's side ------------------------------------------------------------


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel saw it connect."""
    pid_uid_gid = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return struct.unpack("3i", pid_uid_gid)[1]


class _Reporter:
    """A run's progress, sent to the command that submitted it; a command that went away
    does not stop the run."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.connected = True

    def send(self, message: dict[str, Any]) -> None:
        if not self.connected:
            return
        with self._lock:
            try:
                self._stream.write(json.dumps(message, default=str).encode() + b"\n")
                self._stream.flush()
            except OSError:
                self.connected = False

    def stage(self, text: str, *, started: bool = False) -> None:
        self.send({"stage": text, "started": started})

    def update_to(self, done: int, total: int) -> None:
        self.send({"progress": [done, total]})

    def close(self) -> None:
        pass


def _absolute_files(technique: str, values: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Relative file parameters mean the command's folder, not the service's."""
    from calypso.flows.api import parameter_model
    from calypso.techniques.fields import path_values

    model = parameter_model(technique)
    files = {name for name, kind, _ in path_values(model, values) if kind == "file"}

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.join(cwd, value)
        return value

    return {
        name: ([absolute(v) for v in value] if isinstance(value, list) else absolute(value))
        if name in files
        else value
        for name, value in values.items()
    }


def run_submitted(request: dict[str, Any], uid: int, settings: CalypsoSettings, reporter) -> dict:
    """One submitted run, checked as the account ``uid``."""
    from calypso.flows.api import parameters_from, run_technique
    from calypso.flows.techniques import TECHNIQUES
    from calypso.registry.access import acting_as, unix_identity

    technique = request["technique"]
    if technique not in TECHNIQUES:
        raise ConfigurationError(
            f"this service does not know the technique {technique!r} (it knows "
            f"{', '.join(TECHNIQUES)}): is it the same Calypso version as the command?"
        )
    identity = unix_identity(settings, uid)
    values = _absolute_files(technique, dict(request.get("values") or {}), request["cwd"])
    parameters = parameters_from(technique, values, request.get("source") or "")
    with acting_as(identity):  # every check inside the run is the submitter's too
        summary = run_technique(
            technique,
            request["input"],
            parameters,
            request.get("scans"),
            request.get("output"),
            settings,
            export_to=request.get("export_to"),
            identity=identity,
            progress=reporter,
        )
    summary["service"] = str(socket_path(settings))
    return summary


def serve_submissions(settings: CalypsoSettings) -> socketserver.BaseServer | None:
    """Listen on :func:`socket_path` in a background thread; the server it returns is shut
    down (and its socket removed) by :func:`stop_serving`. None, with a warning, when the
    path cannot be a socket's: the deployments are served all the same."""
    import socketserver

    path = socket_path(settings)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        logger.warning(
            "runs cannot be submitted to this service: its socket path %s is longer than the "
            "%d bytes a Unix socket's may be; set CALYPSO_SERVE__SOCKET to a shorter one",
            path,
            MAX_SOCKET_PATH,
        )
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        logger.warning(
            "runs cannot be submitted to this service: %s is not a socket (a file of someone's? "
            "it is left as it is); set CALYPSO_SERVE__SOCKET to a free path",
            path,
        )
        return None
    if path.exists():  # left by a service that was killed; a live one is refused below
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:  # several services may share the deployments; one takes the submissions
            probe.close()
            logger.warning(
                "another Calypso service takes the runs submitted on %s: this one serves its "
                "deployments only (CALYPSO_SERVE__SOCKET gives it a socket of its own)",
                path,
            )
            return None

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            reporter = _Reporter(self.wfile)
            try:
                uid = peer_uid(self.request)
                line = self.rfile.readline(MAX_REQUEST_BYTES)
                request = json.loads(line)
                reporter.send({"accepted": True})
                logger.info(
                    "run submitted by uid %d: %s %s", uid, request["technique"], request["input"]
                )
                reporter.send({"summary": run_submitted(request, uid, settings, reporter)})
            except CalypsoError as exc:
                reporter.send({"error": _as_reply(exc, exc.exit_code)})
            except Exception as exc:  # a failed flow run, a bug: the command still gets a line
                logger.exception("a submitted run failed")
                reporter.send({"error": _as_reply(exc, 1)})

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    server.daemon_threads = True
    # Anyone who can reach the socket may submit; the kernel tells who they are, and the
    # run is confined to their proposals.
    os.chmod(path, 0o666)
    threading.Thread(target=server.serve_forever, name="submissions", daemon=True).start()
    logger.info("runs can be submitted on %s", path)
    return server


def _as_reply(exc: BaseException, exit_code: int) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "exit_code": exit_code}


def stop_serving(server: socketserver.BaseServer | None, settings: CalypsoSettings) -> None:
    if server is None:
        return
    server.shutdown()
    server.server_close()
    socket_path(settings).unlink(missing_ok=True)
