"""Unknown ``CALYPSO_*`` variables and configuration keys are errors, not ignored: a typo
(``CALYPSO_DATA_ROOT``) once turned confinement off without a word. Each is named with the
closest valid setting (difflib)."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from calypso.errors import ConfigurationError

# CALYPSO_* variables that are not settings: read by Calypso itself or its test harness
# and benchmarks, whose commands inherit them (CALYPSO_LOCAL_CORES: set by Calypso in its
# local workers' environment; CALYPSO_SLURM_STATE: deploy/slurm/single-node.sh's folder,
# which made every command in the shell that ran it fail).
_NOT_SETTINGS = frozenset(
    {"CALYPSO_CONFIG", "CALYPSO_TECHNIQUES", "CALYPSO_LOCAL_CORES", "CALYPSO_SLURM_STATE"}
)
_NOT_SETTINGS_PREFIXES = ("CALYPSO_TEST_", "CALYPSO_BENCH_")
# Settings that are gone, and why (an old environment should not be obeyed silently).
_REMOVED = {
    "CALYPSO_USER": "who acts is the Unix account on the command "
    "line and a sign-in on the web; proposals come from groups (access.proposal_groups, "
    "docs/security.md)",
}


def _setting_names(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """Every ``CALYPSO_*`` name of ``model``'s fields, and the prefixes under which any name
    goes (fields that are mappings: ``CALYPSO_SERVE__CONCURRENCY__TOMOGRAPHY``)."""
    names: set[str] = set()
    open_prefixes: set[str] = set()
    for field_name, info in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner, deeper = _setting_names(annotation, f"{name}__")
            names |= inner
            open_prefixes |= deeper
        elif getattr(annotation, "__origin__", None) is dict:
            open_prefixes.add(f"{name}__")
    return names, open_prefixes


def _unknown(name: str, known: set[str], open_prefixes: set[str], spelled: str) -> str | None:
    """Why ``name`` is not a setting (naming the closest one), or None if it is one."""
    if name in known or name.startswith(tuple(open_prefixes)):
        return None
    for removed, why in _REMOVED.items():
        if name == removed or name.startswith(f"{removed}__"):
            return f"{spelled} is not a setting any more: {why}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f": did you mean {_spell(close[0], spelled)}?" if close else ""
    return f"unknown setting {spelled}{hint}"


def _spell(name: str, like: str) -> str:
    """A setting's name as the user wrote theirs: an environment variable or a TOML key."""
    if like.startswith(("CALYPSO_", "calypso_")):
        return name
    return name.removeprefix("CALYPSO_").lower().replace("__", ".")


def check_setting_names(
    settings: type[BaseModel], config_file: Path | None, environ: Mapping[str, str] | None = None
) -> None:
    """Refuse ``CALYPSO_*`` variables and configuration keys that are no setting: a typo
    (``CALYPSO_DATA_ROOT``) would otherwise be ignored silently and change what is confined.

    Raises
    ------
    ConfigurationError
        Naming each unknown one and the closest valid name.
    """
    known, open_prefixes = _setting_names(settings, "CALYPSO_")
    config = _contents(config_file)
    problems = []
    environ = os.environ if environ is None else environ
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith("CALYPSO_") or name in _NOT_SETTINGS:
            continue
        if name.startswith(_NOT_SETTINGS_PREFIXES):
            continue
        problem = _unknown(name, known, open_prefixes, variable)
        if problem:
            problems.append(problem)

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}{str(key).upper()}"
            problem = _unknown(name, known, open_prefixes, _spell(name, "key"))
            if problem:
                problems.append(problem)
            elif isinstance(value, dict) and not name.startswith(tuple(open_prefixes)):
                walk(value, f"{name}__")

    walk(config or {}, "CALYPSO_")
    if problems:
        where = f" (CALYPSO_* variables{f' or {config_file}' if config else ''})"
        raise ConfigurationError(f"invalid Calypso settings{where}: {'; '.join(problems)}")


def _contents(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the Calypso configuration {path}: {exc}") from None
