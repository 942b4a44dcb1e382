"""Sign-in and the session's identity.

A user signs in with their directory password (LDAP: :func:`ldap_sign_in` binds as
them) or through the facility's OpenID Connect provider (:class:`OidcSignIn`: the
authorization-code flow with PKCE, state and nonce). The verified identity (name,
groups, proposals, staff) is kept in the session cookie, signed with the portal's secret
(:func:`calypso.flows.portal.app.session_secret`): a browser can read it, not change it.
Forms that change something carry a token of the session (``csrf``), checked here.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from calypso.errors import ConfigurationError
from calypso.flows.portal import signed_out
from calypso.flows.portal.app import PortalError, SignInRequired, page
from calypso.registry.access import Identity, SignInError

router = APIRouter()


# -- the session ---------------------------------------------------------------------


def _stored(identity: Identity, max_age_s: float) -> dict[str, Any]:
    return {
        "name": identity.name,
        "source": identity.source,
        "groups": sorted(identity.groups),
        "proposals": sorted(identity.proposals),
        "all_proposals": identity.all_proposals,
        "staff": identity.staff,
        "until": time.time() + max_age_s,  # the cookie's own age is checked too
        "sid": secrets.token_urlsafe(16),  # ended by signing out (signed_out.py)
    }


def session_identity(request: Request) -> Identity | None:
    """Who signed in with this browser, or None (never signed in, signed out, expired)."""
    stored = request.session.get("identity")
    if not stored or stored.get("until", 0) < time.time() or "sid" not in stored:
        return None
    if signed_out.ended(request.app.state.settings.home, stored["sid"]):
        return None
    return Identity(
        stored["name"],
        stored["source"],
        frozenset(stored["groups"]),
        frozenset(stored["proposals"]),
        all_proposals=stored["all_proposals"],
        staff=stored["staff"],
        why="signed in to the portal",
    )


def signed_in(request: Request) -> Identity:
    """The signed-in identity (a FastAPI dependency): else sign in first."""
    identity = session_identity(request)
    if identity is None:
        raise SignInRequired()
    return identity


# A route's ``identity: User`` parameter: the signed-in user, or sign in first.
User = Annotated[Identity, Depends(signed_in)]


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, token: str) -> None:
    """A form that changes something came from the portal's own page of this session."""
    expected = request.session.get("csrf", "")
    if not expected or not secrets.compare_digest(expected, token or ""):
        raise PortalError(403, "refused: this form does not come from your session's page")


def _begin_session(request: Request, identity: Identity) -> None:
    from calypso.flows.portal.audit import record

    settings = request.app.state.settings
    request.session.clear()  # a new session: nothing kept from before the sign-in
    request.session["identity"] = _stored(identity, settings.portal.session_max_age_h * 3600)
    csrf_token(request)
    record(settings, identity, "sign in", detail=identity.source)


def _safe_next(target: str | None) -> str:
    """Back where the user was going, on this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    parts = urlsplit(target)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def public_url(request: Request) -> str:
    configured = request.app.state.settings.portal.public_url
    return (configured or str(request.base_url)).rstrip("/")


# -- pages ---------------------------------------------------------------------------


@router.get("/signin")
def sign_in_page(request: Request, next: str = "/") -> Response:
    access = request.app.state.settings.access
    return page(
        request,
        "signin.html",
        next=_safe_next(next),
        ldap=bool(access.ldap.url),
        oidc=bool(access.oidc.issuer and access.oidc.client_id),
        signin_csrf=csrf_token(request),  # another site's form cannot sign this browser in
    )


@router.post("/signin")
async def sign_in_with_password(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    next: str = Form("/"),
    csrf: str = Form(""),
) -> Response:
    from calypso.registry.access.ldap import ldap_sign_in

    # Signed in by another site's form, the browser would show the other account's data
    # as its user's own (and keep what they upload there): the form must be this page's.
    check_csrf(request, csrf)
    settings = request.app.state.settings
    try:
        identity = await run_in_threadpool(ldap_sign_in, username, password, settings)
    except (SignInError, ConfigurationError) as exc:
        access = settings.access
        return page(
            request,
            "signin.html",
            401,
            next=_safe_next(next),
            error=str(exc),
            ldap=bool(access.ldap.url),
            oidc=bool(access.oidc.issuer),
            signin_csrf=csrf_token(request),
        )
    _begin_session(request, identity)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.get("/signin/oidc")
async def sign_in_with_openid_connect(request: Request, next: str = "/") -> Response:
    from calypso.registry.access.oidc import OidcSignIn

    settings = request.app.state.settings
    try:
        pending = await run_in_threadpool(
            lambda: OidcSignIn(settings).begin(f"{public_url(request)}/signin/oidc/callback")
        )
    except (SignInError, ConfigurationError) as exc:
        raise PortalError(503, str(exc)) from None
    # Kept (signed) until the provider sends the browser back; used once.
    request.session["oidc"] = asdict(pending) | {"next": _safe_next(next)}
    return RedirectResponse(pending.url, status_code=303)


@router.get("/signin/oidc/callback")
async def openid_connect_callback(request: Request) -> Response:
    from calypso.registry.access.oidc import OidcSignIn, PendingSignIn

    stored = request.session.pop("oidc", None)
    if not stored:
        raise PortalError(401, "sign-in refused: no sign-in was under way in this browser")
    target = stored.pop("next", "/")
    settings = request.app.state.settings
    try:
        identity = await run_in_threadpool(
            lambda: OidcSignIn(settings).complete(PendingSignIn(**stored), str(request.url))
        )
    except SignInError as exc:
        raise PortalError(401, str(exc)) from None
    _begin_session(request, identity)
    return RedirectResponse(target, status_code=303)


@router.post("/signout")
def sign_out(request: Request, csrf: str = Form("")) -> Response:
    from calypso.flows.portal.audit import record

    check_csrf(request, csrf)
    identity = session_identity(request)
    if identity is not None:
        stored = request.session["identity"]
        signed_out.end_session(request.app.state.settings.home, stored["sid"], stored["until"])
        record(request.app.state.settings, identity, "sign out")
    request.session.clear()
    return RedirectResponse("/signin", status_code=303)
