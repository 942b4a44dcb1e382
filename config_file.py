"""Which TOML file configures Calypso, read without pydantic.

:mod:`calypso.settings` reads the whole file (and validates it); a command that only
needs to know where ``calypso serve`` listens reads it here, so that handing a run to
the service does not first import pydantic-settings (~0.25 s of a run that takes one).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from calypso.errors import ConfigurationError

DEFAULT_CONFIG_FILE = Path("~/.config/calypso/config.toml").expanduser()
DEFAULT_HOME = Path("~/.calypso").expanduser()  # Calypso's own state, unless configured


def config_file_path() -> Path | None:
    """The TOML configuration file in use, or None."""
    named = os.environ.get("CALYPSO_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigurationError(
                f"CALYPSO_CONFIG names {path}, which is not a file: create it or unset the variable"
            )
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def read_config_file() -> dict[str, Any]:
    """The configuration file's tables ({} without one)."""
    path = config_file_path()
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the Calypso configuration {path}: {exc}") from None
