"""``calypso config``: the settings in force, and where each comes from.

A facility engineer's first question about a service that does not do what was meant:
which file is read, and which of its values (or of the ``CALYPSO_*`` variables, which
win over it) took effect. Secrets are shown masked.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from calypso.config_file import DEFAULT_CONFIG_FILE, config_file_path, read_config_file

DEFAULT = "default"
FILE = "file"


def add_commands(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config",
        help="the settings in force and where each comes from (file, variable, default)",
        description="Print the configuration file read, then each setting given by it or by "
        "a CALYPSO_* variable (which wins over the file), with where it comes from. "
        "Secrets are masked.",
    )
    config.add_argument(
        "--all", action="store_true", help="every setting, the embedded defaults too"
    )
    config.add_argument("--json", action="store_true", help="print a machine-readable summary")
    config.set_defaults(handler=command_config)


def command_config(args: argparse.Namespace) -> int:
    from calypso.registry.access.secrets import redact
    from calypso.settings import load_settings

    settings = load_settings()  # refuses unknown names and bad values, as every command
    path = config_file_path()
    rows = [
        (name, value, source)
        for name, value, source in settings_in_force(settings, read_config_file(), os.environ)
        if args.all or source != DEFAULT
    ]
    if args.json:
        summary = {
            "config_file": str(path) if path else None,
            "settings": {name: {"value": v, "source": s} for name, v, s in rows},
        }
        print(redact(json.dumps(summary, indent=2)))
        return 0
    if path is None:
        print(f"configuration file: none (no CALYPSO_CONFIG, no {DEFAULT_CONFIG_FILE})")
    else:
        named = " (CALYPSO_CONFIG)" if os.environ.get("CALYPSO_CONFIG") else ""
        print(f"configuration file: {path}{named}")
    if not rows:
        print("every setting has its embedded default (`calypso config --all` lists them)")
    for name, value, source in rows:
        where = {FILE: "the file", DEFAULT: "default"}.get(source, source)
        print(redact(f"{name} = {json.dumps(value)}  # {where}"))
    return 0


def settings_in_force(
    settings: BaseModel, file: dict[str, Any], environ: os._Environ | dict[str, str]
) -> Iterator[tuple[str, Any, str]]:
    """(dotted name, value as JSON, source) of each setting: the ``CALYPSO_*`` variable
    that gives it (or a table holding it), else ``file`` where the file does, else
    ``default``. A table of free keys (``watch.beamlines``) is one setting."""
    given = {name.upper() for name in environ if name.upper().startswith("CALYPSO_")}
    values = settings.model_dump(mode="json")  # secrets masked by pydantic

    def walk(model: BaseModel, values: dict, table: Any, names: list[str]) -> Iterator:
        for field in type(model).model_fields:
            path = [*names, field]
            inner = getattr(model, field)
            within = table.get(field) if isinstance(table, dict) else None
            if isinstance(inner, BaseModel):
                yield from walk(inner, values[field], within, path)
                continue
            variable = "CALYPSO_" + "__".join(path).upper()
            setting = [
                name
                for name in sorted(given)
                if variable == name
                or variable.startswith(f"{name}__")
                or name.startswith(f"{variable}__")
            ]
            source = setting[0] if setting else FILE if within is not None else DEFAULT
            yield ".".join(path), values[field], source

    yield from walk(settings, values, file, [])
