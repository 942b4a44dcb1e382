"""Sign-in through an LDAP directory: a simple bind as the user (their password checked by
the directory, never by Calypso), then their groups read from the directory
(``posixGroup`` ``memberUid`` or ``groupOfNames`` ``member``), mapped to proposals.

Configured by ``access.ldap`` (docs/security.md). ldap3 is pure Python: no system
library is needed.
"""

from __future__ import annotations

import re
import ssl
from typing import TYPE_CHECKING

from calypso.errors import ConfigurationError
from calypso.registry.access.errors import SignInError
from calypso.registry.access.identity import Identity, identity_from_groups

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings, LdapSettings

# What a user name may be: no filter or DN syntax, no empty name (an anonymous bind).
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _server(ldap: LdapSettings):
    import ldap3

    tls = None
    if ldap.ca_file or ldap.start_tls or ldap.url.lower().startswith("ldaps://"):
        tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(ldap.ca_file) if ldap.ca_file else None,
        )
    seconds = max(1, round(ldap.timeout_s))  # ldap3 packs whole seconds
    return ldap3.Server(ldap.url, connect_timeout=seconds, tls=tls, get_info=ldap3.NONE)


def _connection(server, ldap: LdapSettings, user: str | None, password: str | None):
    import ldap3

    connection = ldap3.Connection(
        server,
        user=user,
        password=password,
        receive_timeout=max(1, round(ldap.timeout_s)),
        raise_exceptions=False,
        auto_bind=ldap3.AUTO_BIND_NONE,
    )
    if ldap.start_tls:
        connection.open()
        connection.start_tls()
    return connection


def _user_dn(server, ldap: LdapSettings, username: str) -> str:
    """The user's DN: from the template, or searched under ``user_base``."""
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import escape_rdn

    if ldap.user_dn:
        return ldap.user_dn.format(username=escape_rdn(username))
    if not ldap.user_base:
        raise ConfigurationError(
            "LDAP sign-in needs access.ldap.user_dn (uid={username},ou=people,...) or "
            "access.ldap.user_base to search users under"
        )
    password = ldap.bind_password.get_secret_value() if ldap.bind_password else None
    search = _connection(server, ldap, ldap.bind_dn, password)
    try:
        if not search.bind():
            raise SignInError(f"the directory refused Calypso's search account: {search.result}")
        search.search(
            ldap.user_base,
            ldap.user_filter.format(username=escape_filter_chars(username)),
            attributes=[],
            size_limit=2,
        )
        entries = list(search.entries)
    finally:
        search.unbind()
    if len(entries) != 1:
        raise SignInError(f"sign-in refused for {username}: wrong user name or password")
    return entries[0].entry_dn


def ldap_sign_in(username: str, password: str, settings: CalypsoSettings) -> Identity:
    """Bind as ``username`` with ``password``; their identity, groups and proposals.

    Raises
    ------
    SignInError
        A wrong user name or password, an unreachable directory (the same message for
        an unknown user and a wrong password).
    ConfigurationError
        LDAP sign-in is not configured.
    """
    from ldap3.core.exceptions import LDAPException
    from ldap3.utils.conv import escape_filter_chars

    ldap = settings.access.ldap
    if not ldap.url:
        raise ConfigurationError(
            "LDAP sign-in is not configured: set access.ldap.url (CALYPSO_ACCESS__LDAP__URL, "
            "e.g. ldaps://ldap.example.org) and access.ldap.user_dn (docs/security.md)"
        )
    if not _USERNAME.fullmatch(username or ""):
        raise SignInError(f"sign-in refused: {username!r} is not a user name")
    if not password:  # an empty password is an unauthenticated bind, which succeeds
        raise SignInError(f"sign-in refused for {username}: no password")
    try:
        server = _server(ldap)
        user_dn = _user_dn(server, ldap, username)
        connection = _connection(server, ldap, user_dn, password)
        try:
            if not connection.bind():
                raise SignInError(f"sign-in refused for {username}: wrong user name or password")
            groups: set[str] = set()
            if ldap.group_base:
                connection.search(
                    ldap.group_base,
                    ldap.group_filter.format(
                        username=escape_filter_chars(username),
                        user_dn=escape_filter_chars(user_dn),
                    ),
                    attributes=[ldap.group_name_attribute],
                )
                for entry in connection.entries:
                    values = entry[ldap.group_name_attribute].values
                    groups.update(str(value) for value in values)
        finally:
            connection.unbind()
    except LDAPException as exc:
        raise SignInError(f"sign-in through {ldap.url} failed: {exc}") from None
    return identity_from_groups(username, "ldap", groups, settings.access)
