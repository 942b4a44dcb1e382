import json
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


@pytest.mark.parametrize(
    ("slurm", "fragment"),
    [
        ({"minimum_jobs": 10, "maximum_jobs": 2}, "minimum_jobs 10 is more than maximum_jobs 2"),
        ({"cores": 4, "processes": 8}, "processes 8 is more than cores 4"),
        ({"memory": "lots"}, "memory 'lots' is not a size"),
        ({"memory": "512MB", "processes": 4, "cores": 4}, "less than 256 MiB"),
        ({"walltime": "2 hours"}, "walltime '2 hours' is not a SLURM time limit"),
        # once in deploy/README.md: workers given it never started
        ({"lifetime": "1h50m"}, "lifetime '1h50m' is not a duration Dask reads"),
        ({"walltime": "01:00:00", "lifetime": "2h"}, "not shorter than walltime '01:00:00'"),
    ],
)
def test_slurm_sizes_are_checked_as_the_settings_are_read(slurm, fragment):
    # Before, each failed later: in a job script SLURM refused, or in workers that never
    # started while the flow run waited for them.
    with pytest.raises(ConfigurationError, match="executor.slurm") as raised:
        load_settings(executor={"kind": "slurm", "slurm": slurm})
    assert fragment in str(raised.value)


def test_slurm_time_limits_in_every_form_sbatch_takes():
    from calypso.cluster_settings import walltime_s

    forms = {"90": 5400, "90:30": 5430, "02:00:00": 7200, "1-12": 129600, "1-0:30": 88200}
    assert {text: walltime_s(text) for text in forms} == forms
    assert walltime_s("2-01:00:05") == 176405
    settings = load_settings(
        executor={
            "slurm": {"walltime": "1-00:00:00", "lifetime": "23h", "cores": 2, "processes": 2}
        }
    )
    assert (settings.executor.slurm.walltime, settings.executor.slurm.lifetime) == (
        "1-00:00:00",
        "23h",
    )
    with pytest.raises(ConfigurationError, match="minimum_workers 3 is more than"):
        load_settings(executor={"openstack": {"minimum_workers": 3, "maximum_workers": 2}})


def test_an_unknown_setting_is_an_error_naming_the_closest_one(monkeypatch, tmp_path):
    # Once ignored: `CALYPSO_DATA_ROOT` (singular) silently turned confinement off.
    monkeypatch.setenv("CALYPSO_DATA_ROOT", "/data/visitor")
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert "unknown setting CALYPSO_DATA_ROOT: did you mean CALYPSO_DATA_ROOTS?" in str(
        raised.value
    )
    monkeypatch.delenv("CALYPSO_DATA_ROOT")
    # nested ones too, in any case, and the keys of a configuration file
    monkeypatch.setenv("calypso_executor__n_worker", "2")
    with pytest.raises(ConfigurationError, match="did you mean CALYPSO_EXECUTOR__N_WORKERS"):
        load_settings()
    monkeypatch.delenv("calypso_executor__n_worker")
    config = tmp_path / "calypso.toml"
    config.write_text('[access]\nstaff_group = ["staff"]\n[serve.concurrency]\ntomography = 1\n')
    monkeypatch.setenv("CALYPSO_CONFIG", str(config))
    with pytest.raises(
        ConfigurationError, match=r"access.staff_group: did you mean access.staff_groups"
    ):
        load_settings()
    # Mappings take any key; variables that are not settings are left alone.
    config.write_text("[serve.concurrency]\ntomography = 1\n")
    monkeypatch.setenv("CALYPSO_SERVE__CONCURRENCY__DIFFRACTION", "3")
    monkeypatch.setenv("CALYPSO_TECHNIQUES", "")
    monkeypatch.setenv("CALYPSO_BENCH_KEEP", "1")  # the benchmarks' own, passed to commands
    settings = load_settings()
    assert settings.serve.concurrency == {"tomography": 1, "diffraction": 3}


def test_who_acts_is_not_a_setting(monkeypatch):
    monkeypatch.setenv("CALYPSO_USER__NAME", "alice")
    with pytest.raises(ConfigurationError, match="CALYPSO_USER__NAME is not a setting any more"):
        load_settings()


@pytest.mark.parametrize(
    ("environment", "config"),
    [
        ({}, ""),
        ({"CALYPSO_SERVE__SOCKET": "/run/calypso/serve.sock"}, ""),
        ({}, 'home = "/srv/calypso"\n'),
        ({"CALYPSO_HOME": "/srv/env-home"}, 'home = "/srv/calypso"\n'),
        ({}, '[serve]\nsocket = "/run/from-file.sock"\n'),
        ({"calypso_serve__socket": "/run/env.sock"}, '[serve]\nsocket = "/run/file.sock"\n'),
        ({"CALYPSO_SERVE__SUBMIT_RUNS": "off"}, ""),
        ({"CALYPSO_SERVE__SUBMIT_RUNS": "Yes"}, "[serve]\nsubmit_runs = false\n"),
        ({}, "[serve]\nsubmit_runs = false\n"),
    ],
)
def test_the_command_finds_the_service_as_the_settings_name_it(
    monkeypatch, tmp_path, environment, config
):
    """`calypso run` looks for the service before reading its settings (issue #18): the
    socket it finds from the variables and the file alone is the one the settings name."""
    from calypso.flows.online.submissions import configured_socket, service_socket

    monkeypatch.delenv("CALYPSO_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default home, and no ~/.config file
    if config:
        (tmp_path / "calypso.toml").write_text(config)
        monkeypatch.setenv("CALYPSO_CONFIG", str(tmp_path / "calypso.toml"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert configured_socket() == service_socket(load_settings())


def test_what_the_command_cannot_tell_alone_is_left_to_the_settings(monkeypatch):
    from calypso.flows.online.submissions import configured_socket

    monkeypatch.setenv("CALYPSO_SERVE__SUBMIT_RUNS", "sometimes")
    assert configured_socket() is None
    with pytest.raises(ConfigurationError, match="submit_runs"):
        load_settings()  # which says what is wrong
    monkeypatch.delenv("CALYPSO_SERVE__SUBMIT_RUNS")
    monkeypatch.setenv("CALYPSO_SERVE", '{"socket": "/run/json.sock"}')
    assert configured_socket() is None


def test_calypso_config_says_which_file_and_where_each_setting_comes_from(
    monkeypatch, tmp_path, capsys
):
    from calypso.flows.cli import main

    config = tmp_path / "calypso.toml"
    config.write_text(
        'data_roots = ["/data/visitor"]\n'
        "[executor.slurm]\ncores = 4\nprocesses = 2\n"
        '[export]\nsecret_access_key = "hunter2-secret"\n'
    )
    monkeypatch.setenv("CALYPSO_CONFIG", str(config))
    monkeypatch.setenv("CALYPSO_EXECUTOR__SLURM__CORES", "8")  # wins over the file
    monkeypatch.setenv("CALYPSO_WATCH__BLISSDATA_URL", "redis://:pw-7f3a@beamline:6379")
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"configuration file: {config} (CALYPSO_CONFIG)"
    for line in [
        'data_roots = ["/data/visitor"]  # the file',
        "executor.slurm.cores = 8  # CALYPSO_EXECUTOR__SLURM__CORES",
        "executor.slurm.processes = 2  # the file",
        'export.secret_access_key = "**********"  # the file',
        'watch.blissdata_url = "redis://:********@beamline:6379"  # CALYPSO_WATCH__BLISSDATA_URL',
    ]:
        assert line in lines
    assert not any(line.startswith("executor.kind") for line in lines)  # a default
    assert main(["config", "--all", "--json"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "pw-7f3a" not in out
    summary = json.loads(out)
    assert summary["config_file"] == str(config)
    assert summary["settings"]["executor.kind"] == {"value": "local", "source": "default"}
    # A bad setting is refused as by every command.
    monkeypatch.setenv("CALYPSO_EXECUTOR__SLURM__PROCESSES", "16")
    assert main(["config"]) == 2
    assert "processes 16 is more than cores 8" in capsys.readouterr().err
