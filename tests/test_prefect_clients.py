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


def test_task_runs_carry_the_flows_prefect_settings_as_objects(tmp_path):
    """A submitted task's context carries the settings objects themselves (no dump to
    validate back on the worker), and a worker that unpickles them sees the flow's own
    settings, the temporary ones included; a dump without secrets is still Prefect's."""
    import pickle

    import cloudpickle
    from prefect.context import SettingsContext, hydrated_context, serialize_context
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        get_current_settings,
        temporary_settings,
    )

    from calypso.flows.runtime import send_prefect_settings_as_objects

    send_prefect_settings_as_objects()
    send_prefect_settings_as_objects()  # twice: Prefect's own dump is kept, not ours
    storage = tmp_path / "kept-results"
    with temporary_settings(
        {PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_LOCAL_STORAGE_PATH: storage}
    ):
        current = get_current_settings()
        carried = serialize_context()["settings_context"]
        assert carried["settings"] is current
        hidden = SettingsContext.get().serialize(include_secrets=False)
        assert isinstance(hidden["settings"], dict)  # Prefect's dump, secrets obfuscated
        on_worker = pickle.loads(cloudpickle.dumps({"settings_context": carried}))
    assert get_current_settings().api.url != "http://127.0.0.1:9/api"
    with hydrated_context(on_worker):
        seen = get_current_settings()
        assert seen.api.url == "http://127.0.0.1:9/api"
        assert seen.results.local_storage_path == storage
        assert seen == current
