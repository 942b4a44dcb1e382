"""Files only their owner may read (mode 0600, in a 0700 folder): Calypso's own secrets.

Each is created whole or not at all: written to a private temporary file, then linked
into place, so that a reader never sees half a key and two processes starting at once
(``calypso serve`` and ``calypso run``) agree on one secret instead of each keeping its
own.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from calypso.errors import ConfigurationError


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 when missing (an existing one keeps its mode: an operator
    may have shared it with a service group on purpose)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create {folder} for Calypso's secrets: {exc}") from None
    return folder


def create_private_file(path: Path, content: bytes, replace: bool = False) -> bool:
    """Write ``content`` to ``path`` (0600) unless it exists; ``replace``: write it anyway.
    True when this call wrote it, False when another process had (the caller reads theirs)."""
    private_folder(path.parent)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, 0o600)  # mkstemp makes it 0600 already; say so
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)  # fails when it exists: the first writer wins
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def read_private_file(path: Path) -> bytes:
    """The content of a secret file, refused when others may read or change it."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"{path} may be read or changed by others (mode {stat.S_IMODE(mode):04o}): "
                f"make it private with `chmod 600 {path}`"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
