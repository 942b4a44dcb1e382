"""Credentials kept out of everything Calypso writes: logs, tracebacks, error messages, the
catalogue, results (docs/security.md, "Secrets").

The values to hide are the ones Calypso holds: every ``SecretStr`` of the settings
(:func:`guard`, called by :func:`calypso.settings.load_settings` in every process that
reads them) and what it reads from a Prefect Secret block (:func:`read_secret_block`).
They are replaced by :data:`REDACTED` wherever text leaves Calypso:

* :class:`calypso.errors.CalypsoError` messages, on construction;
* every log record of the process (a log-record factory, so the libraries' records too:
  pyicat-plus logs the ICAT+ URL, which carries the token, with its tracebacks);
* tracebacks of exceptions nobody caught (``sys.excepthook``, ``threading.excepthook``).

The Prefect API's secret (``PREFECT_API_AUTH_STRING``) is hidden the same way.

Redaction works on known values, not patterns: a credential Calypso was never given
cannot be recognised, and a pattern would also hide checksums and ids.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, SecretStr

REDACTED = "********"
#: Shorter values are not redacted: they would blank ordinary words out of every message
#: (no credential worth the name is this short).
MIN_LENGTH = 4

_known: set[str] = set()  # every form of every secret value seen, longest first at use
_lock = threading.Lock()
_installed = False


def remember(*values: str | SecretStr | None) -> None:
    """Hide ``values`` (and their URL-quoted forms) from now on, in this process."""
    forms = set()
    for value in values:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and len(text) >= MIN_LENGTH:
            forms |= {text, quote(text, safe=""), quote_plus(text)}
    if forms - _known:
        with _lock:
            _known.update(forms)


def secret_values(model: BaseModel) -> Iterator[SecretStr]:
    """Every ``SecretStr`` held by ``model``, nested models, lists and dicts included."""
    for name in type(model).model_fields:
        yield from _secrets_in(getattr(model, name))


def _secrets_in(value: Any) -> Iterator[SecretStr]:
    return _leaves(value, SecretStr)


def _leaves(value: Any, kind: type) -> Iterator[Any]:
    """Every ``kind`` inside ``value``: through models' fields, dicts' values, lists."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _leaves(getattr(value, name), kind)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item, kind)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item, kind)


def redact(text: str) -> str:
    """``text`` with every known secret replaced by :data:`REDACTED`."""
    if not _known or not text:
        return text
    for secret in sorted(_known, key=len, reverse=True):  # a value before its substrings
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def holds_secret(text: str) -> bool:
    return any(secret in text for secret in _known)


def redact_args(args: Iterable[object]) -> tuple[object, ...]:
    """An exception's arguments with the secrets in its strings redacted."""
    return tuple(redact(a) if isinstance(a, str) else a for a in args)


#: Secrets of the environment that are no setting: the Prefect API's (docs/security.md).
ENVIRONMENT_SECRETS = ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")


def guard(settings: BaseModel) -> None:
    """Hide ``settings``' secrets, and the Prefect API's, from this process's logs, errors
    and tracebacks."""
    remember(*secret_values(settings), *(os.environ.get(n) for n in ENVIRONMENT_SECRETS))
    _install()


def _install() -> None:
    """Once a process: scrub log records as they are made, and uncaught tracebacks."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _known:
            _scrub(record)
        return record

    logging.setLogRecordFactory(scrubbed_record)
    excepthook, thread_excepthook = sys.excepthook, threading.excepthook

    def scrubbed_excepthook(kind, error, trace) -> None:
        text = "".join(traceback.format_exception(kind, error, trace))
        if holds_secret(text):
            sys.stderr.write(redact(text))
        else:
            excepthook(kind, error, trace)

    def scrubbed_thread_excepthook(hook: threading.ExceptHookArgs) -> None:
        text = "".join(
            traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback)
        )
        if holds_secret(text):
            name = hook.thread.name if hook.thread else "?"
            sys.stderr.write(f"Exception in thread {name}:\n{redact(text)}")
        else:
            thread_excepthook(hook)

    sys.excepthook = scrubbed_excepthook
    threading.excepthook = scrubbed_thread_excepthook


def _scrub(record: logging.LogRecord) -> None:
    """Redact a record's message, traceback and stack in place. Handlers format a record's
    ``exc_text`` when it is set, so the traceback is formatted here, redacted, and the
    exception itself dropped from the record (a handler rendering it would show it whole)."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: let logging report it as it does
        return
    if holds_secret(message):
        record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if holds_secret(text):
            record.exc_text, record.exc_info = redact(text), None
    if record.stack_info and holds_secret(record.stack_info):
        record.stack_info = redact(record.stack_info)


# -- Prefect Secret blocks -------------------------------------------------------


def read_secret_block(name: str, setting: str) -> Any:
    """The value of the Prefect Secret block ``name`` (named by the setting ``setting``),
    JSON text parsed; its values hidden from now on.

    Prefect's API masks a Secret block's value only when it is a string: one stored as a
    dict (``Secret(value={...})``, what these docs once said) is returned in clear to
    anyone who reads the block. Such a block is stored again here as JSON text, masked,
    with a warning to rotate the credential, which anyone may have read meanwhile.

    Raises
    ------
    ConfigurationError
        When the block cannot be loaded.
    """
    from prefect.blocks.system import Secret

    from calypso.errors import ConfigurationError

    try:
        block = Secret.load(name)
    except ValueError:  # Prefect's answer for a block it does not have
        raise ConfigurationError(
            f"the Prefect server has no Secret block {name!r} ({setting}): create it (see "
            f"docs/operations/export.md) or unset {setting}"
        ) from None
    except Exception as exc:  # only its kind: the text could quote what it read
        raise ConfigurationError(
            f"cannot load the Prefect Secret block {name!r} ({setting}): {type(exc).__name__}"
        ) from None
    stored = block.value.get_secret_value()
    value = json.loads(stored) if isinstance(stored, str) and _is_json(stored) else stored
    remember(*_strings_in(value))
    _install()
    if not isinstance(block.value, SecretStr):
        store_secret_block(name, value)
        logging.getLogger(__name__).warning(
            "the Prefect Secret block %r held a %s, which Prefect's API shows in clear to "
            "whoever reads the block: it is now stored as JSON text, masked; rotate the "
            "credential it holds, it may have been read",
            name,
            type(stored).__name__,
        )
    return value


def store_secret_block(name: str, value: Any) -> None:
    """Save ``value`` in the Prefect Secret block ``name`` as text (JSON unless a string),
    the form Prefect's API masks."""
    from prefect.blocks.system import Secret

    text = value if isinstance(value, str) else json.dumps(value)
    remember(*_strings_in(value))
    Secret(value=SecretStr(text)).save(name, overwrite=True)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _strings_in(value: Any) -> Iterator[str]:
    return _leaves(value, str)
