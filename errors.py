"""The small hierarchy of errors Calypso raises on purpose.

Each message says which file or field is wrong, what was expected and what to
do about it; the CLI prints the message alone (no traceback) and exits with
a non-zero status.
"""

from __future__ import annotations


class CalypsoError(Exception):
    """Base class of every error Calypso reports to a user. Its message never holds a
    credential Calypso knows: messages quote what failed underneath (a URL, a library's
    error), which may carry one (docs/security.md, "Secrets")."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        from calypso.registry.access.secrets import redact_args

        super().__init__(*redact_args(args))


class ConfigurationError(CalypsoError):
    """Settings or a configuration file are invalid."""

    exit_code = 2


class ParameterError(CalypsoError):
    """A processing parameter is unknown, mistyped or inconsistent with the data."""

    exit_code = 2


class DataPolicyError(CalypsoError):
    """A path does not follow the ESRF data policy layout."""

    exit_code = 3


class RawDataError(CalypsoError):
    """Raw data is missing, incomplete or not in the expected format."""

    exit_code = 3


class OutputError(CalypsoError):
    """Results could not be written."""

    exit_code = 4


class CatalogueError(CalypsoError):
    """The catalogue could not record or read a processed dataset."""

    exit_code = 5


class ExportError(CalypsoError):
    """Results could not be exported to (or verified in) an object store or folder."""

    exit_code = 6


def is_ctrl_c(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C (KeyboardInterrupt), also one that a library caught
    and wrapped in an error of its own: pydantic's core says it in its message only
    ("Error calling function `ser_model`: KeyboardInterrupt", a SchemaError building a
    model as a module is imported), others chain it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
