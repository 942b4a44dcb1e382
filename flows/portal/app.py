"""The portal's ASGI application: signed sessions, the page templates, the routes of each
part, and one way of answering a refusal.

Every route that shows data takes the signed-in :class:`~calypso.registry.access.Identity`
(:func:`calypso.flows.portal.auth.signed_in`) and passes each path through
:mod:`calypso.flows.portal.paths`: nothing is read from a path joined from the URL
unchecked.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from calypso.private_files import create_private_file, read_private_file

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
VIEWER = STATIC / "viewer"
SESSION_COOKIE = "calypso_portal"
templates = Jinja2Templates(directory=HERE / "templates")


class PortalError(Exception):
    """A page that cannot be shown: ``status`` 401, 403, 404 ... with one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SignInRequired(Exception):
    """Nobody is signed in: pages send the browser to the sign-in page, the API says 401."""


def session_secret(settings: CalypsoSettings) -> str:
    """The key that signs session cookies: ``<home>/portal-secret`` (256 random bits, 0600),
    made on first start and kept, so that sign-ins survive a restart; deleting it signs
    everyone out."""
    path = settings.home / "portal-secret"
    if not path.exists():
        create_private_file(path, secrets.token_hex(32).encode())
    return read_private_file(path).decode().strip()


def viewer_built() -> bool:
    """Whether ``make install`` built the h5web viewer (it needs node >= 18 and npm)."""
    return (VIEWER / "viewer.js").is_file()


VIEWER_MISSING = (
    "The HDF5 viewer is not built on this server: it needs Node.js >= 18 and npm. Build it "
    "with `make install` (or `npm install && npm run build` in flows/portal/frontend) "
    "and reload this page; the browser and runs work without it."
)


MAX_JOBS = 1000  # launches and exports followed in memory; the catalogue keeps them all


def remember(app: FastAPI, job_id: str, entry: dict[str, Any]) -> None:
    """Follow a launch or an export (its page, its JSON state) until MAX_JOBS newer ones."""
    jobs = app.state.launches
    jobs[job_id] = entry
    for old in list(jobs)[: max(0, len(jobs) - MAX_JOBS)]:
        del jobs[old]


def page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    """A page of the portal, with who is signed in and the session's form token."""
    from calypso.flows.portal.auth import csrf_token, session_identity

    identity = session_identity(request)
    context |= {"identity": identity, "csrf": csrf_token(request) if identity else ""}
    return templates.TemplateResponse(request, template, context, status_code=code)


@asynccontextmanager
async def _releasing_dead_runs(app: FastAPI) -> AsyncIterator[None]:
    """While the portal serves: the runs that died without a word (one it launched and
    was killed with it, say) shown Crashed, not Running (:mod:`calypso.flows.dead_runs`)."""
    from calypso.flows.dead_runs import reap_now_and_then

    stop = threading.Event()
    reap_now_and_then(app.state.settings, stop)
    try:
        yield
    finally:
        stop.set()


def create_app(settings: CalypsoSettings) -> FastAPI:
    """The portal for ``settings`` (data roots, sign-in, Prefect, catalogue, export)."""
    from calypso.flows.portal import auth, browse, exports, h5, launch, runs, saved
    from calypso.registry.access import require_data_roots

    # Every user is confined to proposals under the data roots: none, nothing to show.
    require_data_roots(settings, "calypso portal")
    # Files still being written (live results) open too: HDF5's lock would refuse them.
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    app = FastAPI(
        title="Calypso portal", docs_url=None, redoc_url=None, openapi_url=None,
        lifespan=_releasing_dead_runs,
    )  # fmt: skip
    app.state.settings = settings
    app.state.launches = {}
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=round(settings.portal.session_max_age_h * 3600),
        same_site="lax",  # other sites' forms and scripts do not carry the session
        https_only=settings.portal.secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    for part in (auth, browse, h5, runs, launch, saved, exports):
        app.include_router(part.router)

    @app.exception_handler(SignInRequired)
    async def sign_in_first(request: Request, exc: SignInRequired) -> Response:
        if request.method == "GET" and not request.url.path.startswith("/h5grove"):
            return RedirectResponse(f"/signin?next={request.url.path}", status_code=303)
        return Response("sign in first", status_code=401, media_type="text/plain")

    @app.exception_handler(PortalError)
    async def refused(request: Request, exc: PortalError) -> Response:
        if request.url.path.startswith("/h5grove"):  # h5web reads JSON errors
            return JSONResponse({"message": exc.message}, status_code=exc.status)
        return page(request, "error.html", exc.status, status=exc.status, message=exc.message)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
