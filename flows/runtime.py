"""How the CLI sets up Prefect and Dask before they are imported.

Defaults only (``os.environ.setdefault``): anything a user sets wins.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import ConfigurationError
from calypso.private_files import create_private_file, read_private_file

if TYPE_CHECKING:  # not imported: the local server's keeper needs none of the settings
    from calypso.settings import CalypsoSettings

AUTH = "PREFECT_API_AUTH_STRING"  # what Prefect's clients send (HTTP basic)
SERVER_AUTH = "PREFECT_SERVER_API_AUTH_STRING"  # what Prefect's server requires


def prefect_auth_path(settings: CalypsoSettings) -> Path:
    """The secret of the Prefect server ``calypso server`` starts (0600, in Calypso's home)."""
    return settings.home / "prefect-auth"


def prefect_auth_string(settings: CalypsoSettings) -> str:
    """The server's secret (``user:password``, as Prefect's UI asks for it), made on first
    use. Never printed: whoever needs it reads the file."""
    path = prefect_auth_path(settings)
    if not path.exists():
        create_private_file(path, f"calypso:{secrets.token_urlsafe(32)}\n".encode())
    secret = read_private_file(path).decode().strip()
    if ":" not in secret:
        raise ConfigurationError(f"{path} does not hold user:password: delete it to make one")
    hide_prefect_secret(secret)
    return secret


def hide_prefect_secret(secret: str) -> None:
    """Keep the secret out of this process's logs, errors and tracebacks (docs/security.md,
    "Secrets"): as written, its password alone, and as the Authorization header has it."""
    from calypso.registry.access.secrets import remember

    remember(secret, secret.split(":", 1)[-1], base64.b64encode(secret.encode()).decode())


def prefect_auth_headers() -> dict[str, str]:
    """The header Prefect's own clients send, for Calypso's plain HTTP requests to the API."""
    secret = os.environ.get(AUTH)
    if not secret:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def prepare_environment(settings: CalypsoSettings, verbose: bool = False) -> None:
    """Quiet, offline-friendly defaults for Prefect and Dask in this process and its children."""
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    path = prefect_auth_path(settings)
    if os.environ.get("PREFECT_API_URL") and AUTH not in os.environ and path.exists():
        # The secret of the server `calypso server` started with this home; a variable
        # set by the user (another server's secret) wins.
        os.environ[AUTH] = prefect_auth_string(settings)
    defaults = {
        # No telemetry from a beamline machine (and no noise when offline).
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's client reads only this one (3.x prints a telemetry banner on first use).
        "DO_NOT_TRACK": "1",
        # The terminal shows Calypso's own summary; the full logs go to the
        # Prefect API (UI) at INFO whatever the console shows.
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO" if verbose else "CRITICAL",
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO" if verbose else "ERROR",
        "PREFECT_LOGGING_INTERNAL_LEVEL": "ERROR",
        "DASK_LOGGING__DISTRIBUTED": "info" if verbose else "error",
        "DASK_DISTRIBUTED__ADMIN__LOG_LENGTH": "1000",
        # The local cluster's nannies write the workers' environment into this
        # process too; numba must see the same thread count from the start.
        "NUMBA_NUM_THREADS": str(settings.executor.threads_per_worker),
        # Chunk results a retried run reuses (tasks/caching.py); workers inherit it.
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.result_storage),
    }
    if find_spec("pyopencl") is None:
        # silx warns at import when pyopencl is absent; without it OpenCL is off anyway.
        defaults["SILX_OPENCL"] = "0"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    if not verbose:
        # The STOMP client logs every failed connection attempt; an unreachable
        # broker is reported once, as a warning about the outbox.
        logging.getLogger("stompest").setLevel(logging.CRITICAL)
    # Kept chunk results past their age go (serve's start, every run): they are pickles
    # naming the proposal's files, kept for retries only.
    from calypso.tasks.result_storage import prune_results

    prune_results()


class _OneContextPerFile:
    """Prefect's client module's ``ssl``, but a verifying context made once per CA file.

    Prefect 3 makes a new SSL context for every client it creates, parsing certifi's
    whole CA bundle (~20 ms of CPU) even for a plain ``http://`` server; the flow engine
    and each task run's engine create their own, which is ~0.1 s of a small run's second
    (measured with py-spy on ``calypso serve``; Prefect PR #19106 would let callers pass
    one). A context verifying against the same, unchanged file is the same context, and
    Prefect never changes a verifying one after making it. The unverified one (no file
    named) is made fresh each time: Prefect changes it after making it.
    """

    def __init__(self, ssl_module: Any) -> None:
        self._ssl = ssl_module
        self._made: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ssl, name)

    def create_default_context(self, *args: Any, cafile: str | None = None, **kw: Any) -> Any:
        if args or kw or cafile is None:
            return self._ssl.create_default_context(*args, cafile=cafile, **kw)
        key = (cafile, os.stat(cafile).st_mtime_ns)
        with self._lock:
            if key not in self._made:
                self._made[key] = self._ssl.create_default_context(cafile=cafile)
            return self._made[key]


def share_prefect_tls_context() -> None:
    """Prefect's clients in this process verify TLS with one context per CA file
    (:class:`_OneContextPerFile`); called where Prefect runs flows and tasks."""
    import prefect.client.orchestration as clients

    if not isinstance(clients.ssl, _OneContextPerFile):
        clients.ssl = _OneContextPerFile(clients.ssl)


_prefect_settings_dump: Any = None  # Prefect's own SettingsContext.serialize


def _settings_as_they_are(self: Any, include_secrets: bool = True) -> dict[str, Any]:
    """:meth:`prefect.context.SettingsContext.serialize`, but the context's own settings
    objects rather than a dump of them (see :func:`send_prefect_settings_as_objects`)."""
    if not include_secrets:  # a dump that hides them: Prefect's own
        return _prefect_settings_dump(self, include_secrets=False)
    return {"profile": self.profile, "settings": self.settings}


def send_prefect_settings_as_objects() -> None:
    """Each task run submitted to Dask carries Prefect's settings as the objects they are,
    not as a dump that the task's process validates back into objects.

    Prefect serialises its whole context for every task it submits: the settings' dump
    (~55 nested models) took 22-78 ms of the flow's thread a task, and validating it back
    on the worker (pydantic-settings reading the environment for each model) 63 ms more:
    ~0.1-0.15 CPU-s a chunk task, measured on ``calypso serve``'s runs. Settings objects
    are never changed once made (Prefect makes new ones), pickle as they are (~10 kB) and
    are accepted by the worker's context as they are: 1.3 ms a task there. The dump Prefect
    makes without secrets (``include_secrets=False``) is left to Prefect."""
    global _prefect_settings_dump
    from prefect.context import SettingsContext

    if SettingsContext.serialize is _settings_as_they_are:
        return
    _prefect_settings_dump = SettingsContext.serialize
    SettingsContext.serialize = _settings_as_they_are  # type: ignore[method-assign]


def check_prefect_api(timeout_s: float = 10.0) -> None:
    """Fail early, with a message, when PREFECT_API_URL names a server that does not answer
    or refuses this process's credentials (its health check answers anyone: ask more)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    version = urllib.request.Request(url.rstrip("/") + "/admin/version")
    for name, value in prefect_auth_headers().items():
        version.add_unredirected_header(name, value)
    try:
        with urllib.request.urlopen(version, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ConfigurationError(
                f"the Prefect API at {url} refused this process's credentials (HTTP 401): "
                + (
                    f"{AUTH} is not the server's secret"
                    if AUTH in os.environ
                    else f"set {AUTH}, or run Calypso with the home of the `calypso server` "
                    "that started it (it reads <home>/prefect-auth)"
                )
            ) from None
        problem = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigurationError(
        f"the Prefect API at {url} does not answer ({problem}): start it (`calypso server`) "
        "or unset PREFECT_API_URL to run with Prefect's ephemeral server"
    )


def prefect_api_secret(settings: CalypsoSettings) -> str | None:
    """The secret this process presents to its Prefect API: the variable's, else, for the
    home's local server (no ``PREFECT_API_URL`` given), the home's own."""
    if os.environ.get(AUTH) or os.environ.get("PREFECT_API_URL"):
        return os.environ.get(AUTH)
    return prefect_auth_string(settings)
