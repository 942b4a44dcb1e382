"""Writes that fail because of where they write (a full disk, a quota, a read-only or
forbidden folder): one :class:`~calypso.errors.OutputError` naming the folder and what
to do, instead of the tracebacks of every layer the failure crossed."""

from __future__ import annotations

import atexit
import contextlib
import errno as _errno
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from calypso.errors import OutputError

T = TypeVar("T")

#: What each errno of a failed write means to the person who chose the output folder.
OUTPUT_ERRNOS = {
    _errno.ENOSPC: "the disk is full",
    _errno.EDQUOT: "the disk quota is exceeded",
    _errno.EFBIG: "a file would be larger than this process or file system allows",
    _errno.EROFS: "the file system is read-only",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "permission denied",
}
# HDF5 reports the system's error in its message only: "... errno = 28, error message = ..."
_HDF5_ERRNO = re.compile(r"errno = (\d+)")
_HDF5_FILE = re.compile(r"\b(?:file)?name = '([^']+)'")
_NO_ROOM = (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG)


def _output_errno(exc: BaseException | None) -> tuple[int, bool, str | None] | None:
    """The errno of a failed write in ``exc`` or what caused it, whether HDF5 saw it, and
    the file it failed on when known."""
    seen: set[int] = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        match = _HDF5_ERRNO.search(text)
        code = int(match.group(1)) if match else getattr(exc, "errno", None)
        if code in OUTPUT_ERRNOS:
            name = _HDF5_FILE.search(text) if match else None
            path = name.group(1) if name else getattr(exc, "filename", None)
            if match:
                return code, True, path
            found = found or (code, False, path)
        exc = exc.__cause__ or exc.__context__
    return found


def translating_write_errors(generator_function: Callable[..., Iterator[T]]):
    """Decorate a generator (a ``contextmanager`` that writes ``finals``, the output paths
    given as its arguments) so that a write that fails for lack of space, quota or
    permission raises one :class:`OutputError` naming the folder and what to do, instead of
    the tracebacks of every layer it crossed. A permission refused on a file outside the
    output folder (a raw file the writer reads) is not the output's problem: it is left as
    it is.

    A disk that fills during an HDF5 write also breaks HDF5 itself: once a file cannot be
    flushed, its datasets stay half closed, and HDF5's own exit handler crashes on them
    (a segmentation fault, exit status 139, after the error is reported). Python's exit
    handlers run before the C library's, so the process then ends from one of them, with
    the error's exit status, once its streams are flushed. Meanwhile h5py's complaints
    about the objects it cannot release are not printed: they are that same error. (HDF5
    can also crash while it closes such a file, before any error reaches Python: only
    the check of the free space before the run, and writers that never let HDF5 meet a
    full disk, avoid that.)
    """

    @functools.wraps(generator_function)
    def wrapper(*finals: Any, **options: Any) -> Iterator[T]:
        folder = Path(finals[-1]).parent if finals else Path.cwd()
        root = os.path.commonpath([Path(f).parent.absolute() for f in finals] or [folder])
        previous = sys.unraisablehook

        def quiet(unraisable: Any) -> None:
            if _output_errno(unraisable.exc_value) is None:
                previous(unraisable)

        sys.unraisablehook = quiet
        try:
            yield from generator_function(*finals, **options)
        except (OSError, RuntimeError) as exc:
            error = as_output_error(exc, folder, root)
            if error is None:
                raise
            raise error from None
        finally:
            sys.unraisablehook = previous

    return wrapper


def as_output_error(
    exc: BaseException, folder: str | Path, root: str | Path | None = None
) -> OutputError | None:
    """The :class:`OutputError` to report for ``exc`` raised while writing in ``folder`` (and
    files under ``root``, default ``folder``), or None when it is not about where the
    results go: no space or quota left, a file size limit, a read-only or forbidden folder.
    For any writer (part files too) that wants to say so in one line."""
    found = _output_errno(exc)
    if found is None:
        return None
    code, through_hdf5, path = found
    ours = path is None or Path(path).absolute().is_relative_to(Path(root or folder).absolute())
    if code not in _NO_ROOM and not ours:
        return None
    if through_hdf5:
        _end_before_hdf5_exits(OutputError.exit_code)
    advice = (
        "free some space or choose another output folder (--output DIR)"
        if code in _NO_ROOM
        else "choose a folder you can write to (--output DIR)"
    )
    return OutputError(
        f"cannot write the results in {folder}: {OUTPUT_ERRNOS[code]} ({os.strerror(code)}); "
        f"the results were not published: {advice}, then run again"
    )


_ending: list[int] = []  # the exit status once HDF5 is known broken


def _end_before_hdf5_exits(status: int) -> None:
    if _ending:
        return
    _ending.append(status)

    def end() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    atexit.register(end)
