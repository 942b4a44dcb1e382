from pathlib import Path

import pytest

from calypso.errors import ConfigurationError
from calypso.settings import load_settings


def test_embedded_defaults_run_on_one_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("CALYPSO_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.executor.kind == "local"
    assert settings.catalogue.backend == "sqlite"
    assert settings.catalogue_path == tmp_path / "catalogue.sqlite"
    assert settings.processed_data.processed_dirname == "PROCESSED_DATA"


def test_environment_variables_override_nested_fields(monkeypatch):
    monkeypatch.setenv("CALYPSO_EXECUTOR__N_WORKERS", "3")
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", '["/data/visitor", "/data/id11/inhouse"]')
    settings = load_settings()
    assert settings.executor.n_workers == 3
    assert settings.data_roots == [Path("/data/visitor"), Path("/data/id11/inhouse")]


def test_config_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    config = tmp_path / "calypso.toml"
    config.write_text(
        'data_roots = ["/mnt/visitor"]\n'
        "[executor]\nn_workers = 8\n"
        '[processed_data]\nprocessed_dirname = "NOBACKUP"\n'
    )
    monkeypatch.setenv("CALYPSO_CONFIG", str(config))
    monkeypatch.setenv("CALYPSO_EXECUTOR__N_WORKERS", "2")
    settings = load_settings()
    assert settings.data_roots == [Path("/mnt/visitor")]
    assert settings.processed_data.processed_dirname == "NOBACKUP"
    assert settings.executor.n_workers == 2


def test_bad_settings_say_what_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CALYPSO_EXECUTOR__KIND", "cloud")
    with pytest.raises(ConfigurationError, match="executor.kind"):
        load_settings()
    monkeypatch.delenv("CALYPSO_EXECUTOR__KIND")
    monkeypatch.setenv("CALYPSO_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match="missing.toml"):
        load_settings()
