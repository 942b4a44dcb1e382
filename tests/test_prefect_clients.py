"""Prefect's clients in Calypso's processes share one verifying TLS context (issue #18:
each client used to parse the whole CA bundle, ~25 ms, several times a run)."""

from __future__ import annotations

import ssl

from calypso.flows.runtime import share_prefect_tls_context


def transport_context(client) -> ssl.SSLContext:
    return client._client._transport._pool._ssl_context


def test_clients_verify_with_one_context_and_the_insecure_one_stays_apart(monkeypatch):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    share_prefect_tls_context()
    share_prefect_tls_context()  # twice: still one wrapper
    first, second = (SyncPrefectClient("https://prefect.example/api") for _ in range(2))
    shared = transport_context(first)
    assert transport_context(second) is shared
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
    assert shared.cert_store_stats()["x509_ca"] > 0  # the CA bundle is loaded

    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = transport_context(SyncPrefectClient("https://prefect.example/api"))
    assert insecure is not shared and insecure.verify_mode == ssl.CERT_NONE
    assert transport_context(SyncPrefectClient("https://prefect.example/api")) is shared
    assert shared.verify_mode == ssl.CERT_REQUIRED
