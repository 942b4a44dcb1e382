"""Sign-in through OpenID Connect: the authorization-code flow (with PKCE, state and nonce)
against the facility's issuer; the ID token is verified with the issuer's published keys
(JWKS): signature, issuer, audience, expiry and nonce. Groups (or proposals) come from
configurable claims.

The portal calls :meth:`OidcSignIn.begin` (redirect the browser to ``url``, keep the
pending sign-in in its session) and :meth:`OidcSignIn.complete` with the URL the browser
came back to. ``calypso whoami --oidc`` does the same with a loopback redirect.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from calypso.errors import ConfigurationError
from calypso.registry.access.errors import SignInError
from calypso.registry.access.identity import Identity, identity_from_groups

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

# Signatures accepted on ID tokens (never 'none', never a symmetric key the client knows).
_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


@dataclass(frozen=True)
class PendingSignIn:
    """A sign-in under way: kept by the caller (the portal's session) until the browser
    comes back to ``redirect_uri``."""

    url: str  # where to send the browser
    redirect_uri: str
    state: str
    nonce: str
    code_verifier: str


class OidcSignIn:
    """The authorization-code flow against ``access.oidc.issuer``."""

    def __init__(self, settings: CalypsoSettings) -> None:
        self.settings = settings
        self.oidc = settings.access.oidc
        if not self.oidc.issuer or not self.oidc.client_id:
            raise ConfigurationError(
                "OpenID Connect sign-in is not configured: set access.oidc.issuer and "
                "access.oidc.client_id (CALYPSO_ACCESS__OIDC__ISSUER, ...; docs/security.md)"
            )
        self.issuer = self.oidc.issuer.rstrip("/")

    def _get(self, url: str) -> dict[str, Any]:
        import requests

        try:
            response = requests.get(url, timeout=self.oidc.timeout_s)
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as exc:
            raise SignInError(f"the identity provider {self.issuer} is unreadable: {exc}") from None

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """The issuer's discovery document; its ``issuer`` must be the one configured."""
        metadata = self._get(f"{self.issuer}/.well-known/openid-configuration")
        if str(metadata.get("issuer", "")).rstrip("/") != self.issuer:
            raise SignInError(
                f"the identity provider at {self.issuer} names itself "
                f"{metadata.get('issuer')!r}: refused"
            )
        return metadata

    def _client(self, redirect_uri: str):
        from authlib.integrations.requests_client import OAuth2Session

        secret = self.oidc.client_secret
        return OAuth2Session(
            client_id=self.oidc.client_id,
            client_secret=secret.get_secret_value() if secret else None,
            scope=" ".join(self.oidc.scopes),
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
        )

    def begin(self, redirect_uri: str) -> PendingSignIn:
        """Where to send the browser, and what to keep until it comes back."""
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(
                self.metadata["authorization_endpoint"],
                state=state,
                nonce=nonce,
                code_verifier=verifier,
            )
        return PendingSignIn(url, redirect_uri, state, nonce, verifier)

    def complete(self, pending: PendingSignIn, callback_url: str) -> Identity:
        """The browser came back to ``callback_url``: exchange the code, verify the ID
        token, and return who signed in.

        Raises
        ------
        SignInError
            Denied by the provider, a wrong state, a token that does not verify.
        """
        query = {k: v[0] for k, v in parse_qs(urlsplit(callback_url).query).items()}
        if "error" in query:
            raise SignInError(
                f"sign-in refused by {self.issuer}: {query['error']} "
                f"{query.get('error_description', '')}".strip()
            )
        if not secrets.compare_digest(query.get("state", ""), pending.state):
            raise SignInError("sign-in refused: the answer is not for this sign-in (state)")
        if "code" not in query:
            raise SignInError("sign-in refused: the identity provider gave no code")
        try:
            with self._client(pending.redirect_uri) as client:
                token = client.fetch_token(
                    self.metadata["token_endpoint"],
                    code=query["code"],
                    code_verifier=pending.code_verifier,
                    timeout=self.oidc.timeout_s,
                )
        except Exception as exc:  # OAuth errors, HTTP errors: the provider said no
            raise SignInError(f"sign-in refused by {self.issuer}: {exc}") from None
        if "id_token" not in token:
            raise SignInError(f"sign-in refused: {self.issuer} returned no ID token")
        return self.identity(self.verify(token["id_token"], pending.nonce))

    def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims, once its signature (issuer's JWKS), issuer, audience,
        expiry and nonce are checked."""
        from joserfc import jwt
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        keys = KeySet.import_key_set(self._get(self.metadata["jwks_uri"]))
        try:
            token = jwt.decode(id_token, keys, algorithms=_ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=self.oidc.leeway_s,
                iss={"essential": True, "value": self.metadata["issuer"]},
                aud={"essential": True, "value": self.oidc.client_id},
                exp={"essential": True},
                sub={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise SignInError(f"sign-in refused: the ID token does not verify ({exc})") from None
        return token.claims

    def identity(self, claims: dict[str, Any]) -> Identity:
        """Who the verified claims name; groups and proposals from the configured claims
        (Keycloak writes groups as paths: '/ma1234' is group 'ma1234')."""
        name = claims.get(self.oidc.username_claim)
        if not isinstance(name, str) or not name:
            raise SignInError(
                f"sign-in refused: the ID token has no {self.oidc.username_claim!r} claim "
                "(access.oidc.username_claim)"
            )
        groups = [str(g).rsplit("/", 1)[-1] for g in _as_list(claims.get(self.oidc.groups_claim))]
        proposals: list[str] = []
        if self.oidc.proposals_claim:
            proposals = [str(p) for p in _as_list(claims.get(self.oidc.proposals_claim))]
        return identity_from_groups(name, "oidc", groups, self.settings.access, proposals=proposals)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
