"""What a run opens, kept inside its proposal by the kernel (Linux Landlock).

:func:`~calypso.registry.access.confine.confine` checks what a run will read before the
run starts; a member of the proposal could still swap a file or a link in their own
proposal between that check and the read, and make a service that may read every
proposal read another one's frames into their result. A run's reads therefore happen in
threads the kernel itself confines: they may open files only beneath the proposal's
folder (read and write), the shared read-only folders (``access.shared_paths``), and
Python's and the system's libraries (read), with Calypso's own scratch. A file, folder,
symlink or HDF5 link that leads elsewhere, whenever it was made, fails to open
(``EACCES``), and the run fails with a refusal instead of a result; nothing is created
outside the proposal. The portal's threads read only.

Landlock (Linux 5.13 and later, ``lsm=...,landlock``) needs no privilege and restricts
one thread at a time, for good: confined work runs in threads kept for its proposal.
Where the kernel has no Landlock, files are checked before, not held, as before (writes
are checked again where they happen:
:func:`~calypso.registry.access.confine.still_in_proposal`); the service and the portal
say which as they start (:func:`describe`).

Examples
--------
>>> within(Confinement("ih0001", ("/data/visitor/ih0001",)), len, "frames")  # doctest: +SKIP
6
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import importlib
import logging
import os
import re
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings

Result = TypeVar("Result")

# The three Landlock system calls have the same numbers on every architecture.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_RULE_PATH_BENEATH = 1
_READ_FILE, _READ_DIR = 1 << 2, 1 << 3
# Writing: WRITE_FILE, REMOVE_DIR, REMOVE_FILE, the MAKE_* (character device to symlink)
# in ABI 1; REFER (a rename or link into another folder) from ABI 2; TRUNCATE from 3.
_WRITE = (1 << 1) | sum(1 << bit for bit in range(4, 13))
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_FILE_RIGHTS = (1 << 0) | (1 << 1) | _READ_FILE | _TRUNCATE  # what a rule on a file may allow
_PR_SET_NO_NEW_PRIVS = 38

# What any Python thread may need to open while a run reads: libraries loaded late (an
# HDF5 filter, a module imported on first use), time zones, the loader's cache, CPU
# counts, the libraries loaded (threadpoolctl). Not /proc as a whole (other processes'
# environments), nor /etc.
_SYSTEM = ("/usr", "/lib", "/lib64", "/sys/devices/system/cpu")
_SYSTEM_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/dev/urandom",
    "/proc/self/maps",
    "/proc/self/stat",  # psutil's memory and CPU figures (Dask's garbage-collection watch)
    "/proc/self/statm",
    "/proc/self/status",  # libffi's probes
    "/proc/mounts",
    "/proc/stat",  # psutil: CPU times (a failed first read breaks them for the process)
    "/proc/cpuinfo",  # numba: the CPU's features
    "/proc/sys/vm/overcommit_memory",  # allocators' settings
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/etc/ssl/openssl.cnf",
    "/etc/magic",  # `file`, which larch runs on a file it reads
)
_WRITABLE_FILES = ("/dev/null",)


@dataclass(frozen=True)
class Confinement:
    """Where a confined thread may open files: ``writable`` folders (the proposal's own,
    a staging folder of the run's), ``readable`` ones (the shared read-only folders), and
    the libraries. Hashable: the threads kept for it are found by it."""

    proposal: str
    writable: tuple[str, ...]
    readable: tuple[str, ...] = ()

    def and_writable(self, folder: str | Path) -> Confinement:
        return Confinement(self.proposal, (*self.writable, str(folder)), self.readable)

    def reading_only(self) -> Confinement:
        """The same folders, none writable (the portal reads, it never writes)."""
        return Confinement(self.proposal, (), (*self.writable, *self.readable))


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.cache
def _syscall() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


@functools.cache
def abi_version() -> int:
    """The kernel's Landlock version; 0 where it has none (or this is not Linux)."""
    if sys.platform != "linux":
        return 0
    version = _syscall()(
        ctypes.c_long(_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1)
    )
    return max(int(version), 0)


def describe() -> str:
    """One line for a service's start: whether its runs' reads are confined by the kernel."""
    version = abi_version()
    if version:
        return (
            "what a run or the portal opens is kept inside its proposal by the kernel "
            f"(Landlock ABI {version})"
        )
    return (
        "what a run or the portal opens is checked first, not kept inside its proposal by "
        "the kernel: this kernel has no Landlock (Linux >= 5.13 booted with "
        "lsm=...,landlock); see docs/security.md"
    )


def _check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"Landlock {what}: {os.strerror(error)}")
    return result


@functools.cache
def _libraries() -> tuple[str, ...]:
    """Where this Python's code lies: its prefixes, its site-packages, Calypso's package."""
    import calypso

    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    places |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    places.add(os.path.dirname(os.path.abspath(calypso.__file__)))
    return tuple(sorted(places))


def _handled() -> int:
    version = abi_version()
    return (
        _READ_FILE
        | _READ_DIR
        | _WRITE
        | (_REFER if version >= 2 else 0)
        | (_TRUNCATE if version >= 3 else 0)
    )


def _allow(ruleset: int, place: str, rights: int) -> None:
    try:
        handle = os.open(place, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not there: nothing to allow
    try:
        if not stat.S_ISDIR(os.fstat(handle).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(rights & _handled(), handle)
        _check(
            _syscall()(
                ctypes.c_long(_ADD_RULE),
                ctypes.c_int(ruleset),
                ctypes.c_int(_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"allowing {place}",
        )
    finally:
        os.close(handle)


def confine_this_thread(confinement: Confinement) -> None:
    """From now on this thread (and threads it starts) opens files only beneath the
    folders of ``confinement`` and the system's and Python's libraries, and writes only
    beneath its writable ones. Irreversible."""
    attr = _RulesetAttr(_handled())
    ruleset = _check(
        _syscall()(
            ctypes.c_long(_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
            ctypes.c_uint32(0),
        ),
        "creating a ruleset",
    )
    try:
        everything = _handled()
        for place in (*confinement.writable, *_WRITABLE_FILES, *_calypso_scratch()):
            _allow(ruleset, place, everything)
        for place in (*confinement.readable, *_libraries(), *_SYSTEM, *_SYSTEM_FILES):
            _allow(ruleset, place, _READ_FILE | _READ_DIR)
        # Required of a thread without CAP_SYS_ADMIN; it only stops execve gaining rights.
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(
            _syscall()(ctypes.c_long(_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
            "restricting the thread",
        )
    finally:
        os.close(ruleset)


# Threads confined to one proposal's folders, kept for the next read of that proposal:
# what a thread keeps (its OpenMP team and settings, :mod:`calypso.executors.worker_setup`)
# then lasts from chunk to chunk, as in an unconfined worker. A few proposals at a time.
_POOLS: OrderedDict[Confinement, ThreadPoolExecutor] = OrderedDict()
_POOLS_LOCK = threading.Lock()
_KEPT_POOLS = 4
_here = threading.local()  # .confinement: what this thread is confined to


def _calypso_scratch() -> list[str]:
    """What a confined thread of Calypso's own may also write: the running chunks' folder
    (worker processes sharing the cores, :mod:`calypso.executors.worker_setup`), and the
    ``__pycache__`` folders where numba keeps the kernels it compiled (a kernel compiled
    for new types is saved there; numba fails a call whose kernel it cannot save)."""
    from calypso.executors.worker_setup import running_chunks_folder

    places = [str(folder)] if (folder := running_chunks_folder()) else []
    folders = {os.path.dirname(f) for m in list(sys.modules.values()) if (f := _file_of(m))}
    for package in sorted(folders):  # each package's folder once: ~6 ms, not ~50
        cache = os.path.join(package, "__pycache__")
        with suppress(OSError):
            if any(name.endswith(".nbi") for name in os.listdir(cache)):
                places.append(cache)
    return places


def _file_of(module: ModuleType) -> str | None:
    file = getattr(module, "__file__", None)
    return file if isinstance(file, str) else None


# One thread of this process that is never confined: it imports, for a confined thread, a
# library that looks at the machine as it is imported (:func:`imported`). Started by an
# unconfined thread (a thread a confined one starts is confined too).
_OUTSIDE_NAME = "calypso-unconfined"
_OUTSIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_OUTSIDE_NAME)
_prepared: list[bool] = []


def _after_fork() -> None:
    """A forked process has none of its parent's threads: its pools start anew."""
    global _OUTSIDE, _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()
    _OUTSIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_OUTSIDE_NAME)
    _prepared.clear()


os.register_at_fork(after_in_child=_after_fork)


def _prepare_process() -> None:
    """Once, from an unconfined thread: what a library looks for the first time it is used
    and keeps (the temporary folder; psutil's view of the machine), the running chunks'
    folder made, and the thread that imports for confined ones."""
    if _prepared:
        return
    import tempfile

    from calypso.executors.worker_setup import running_chunks_folder

    tempfile.gettempdir()
    with suppress(ImportError):
        import psutil  # noqa: F401
    running_chunks_folder()
    _OUTSIDE.submit(int).result()
    _prepared.append(True)


def imported(name: str) -> ModuleType:
    """The module ``name``, imported outside the confinement when this thread may be
    confined: larch, matplotlib, joblib and others look for a temporary folder, their
    configuration, their caches or the machine's semaphores as they are imported, and
    keep what they found. A thread a confined one started (a writer's drawing thread) is
    confined without knowing it: only a process that confined no thread yet, and the
    importing thread itself, import here."""
    if name in sys.modules:  # imported, or being imported: then its lock waits for it
        return importlib.import_module(name)  # (sys.modules alone gave it half made)
    if not _prepared or threading.current_thread().name.startswith(_OUTSIDE_NAME):
        return importlib.import_module(name)
    return _OUTSIDE.submit(importlib.import_module, name).result()


def _submit(confinement: Confinement, call: Callable[[], Result]) -> Future[Result]:
    """``call`` handed to a thread kept for ``confinement`` (inside the lock: a pool let go
    for another proposal's meanwhile would take nothing more)."""
    _prepare_process()
    with _POOLS_LOCK:
        pool = _POOLS.pop(confinement, None) or ThreadPoolExecutor(
            max_workers=32, thread_name_prefix=f"calypso-{confinement.proposal}"
        )
        _POOLS[confinement] = pool
        while len(_POOLS) > _KEPT_POOLS:
            _POOLS.popitem(last=False)[1].shutdown(wait=False)  # its threads end when idle
        return pool.submit(_confined, confinement, call)


def _confined(confinement: Confinement, call: Callable[[], Result]) -> Result:
    if getattr(_here, "confinement", None) != confinement:
        confine_this_thread(confinement)
        _here.confinement = confinement
    return call()


def within(
    confinement: Confinement | None, function: Callable[..., Result], *args: Any, **kwargs: Any
) -> Result:
    """``function(*args, **kwargs)`` in a thread confined to ``confinement``; called here
    directly when it is None (not confined), where the kernel has no Landlock, or in a
    thread confined so already. The caller's context variables (Prefect's run context, its
    logger) go with it; what it raises is raised here, a file the kernel kept it from
    opening as a refusal (:class:`~calypso.registry.access.errors.AccessError`)."""
    if confinement is None or not abi_version():
        return function(*args, **kwargs)
    if getattr(_here, "confinement", None) == confinement:
        return function(*args, **kwargs)
    current_settings()  # read here, where the configuration file may be read
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args, **kwargs)
    future = _submit(confinement, call)
    try:
        return future.result()
    except KeyboardInterrupt:
        _let_finish(future)
        raise
    except BaseException as error:
        refused = _refused(error, confinement)
        if refused is error:
            raise
        raise refused from error


def _let_finish(future: Future[Any]) -> None:
    """Wait for a confined call whose caller a Ctrl-C interrupted: Python cannot stop its
    thread, which went on (writing a run's result) into the command's exit, its imports and
    Prefect's logs refused there (tracebacks after `interrupted`)."""
    if wait([future], timeout=1.0).not_done:  # a second Ctrl-C leaves at once
        log = "interrupted: the step in progress ends first (Ctrl-C again to stop at once)"
        logging.getLogger(__name__).warning(log)
        wait([future])


_PATH_IN_TEXT = re.compile(r"/[^\s'\"()\[\],;]+")


def _refused(error: BaseException, confinement: Confinement) -> BaseException:
    """``error``, or a refusal where the kernel kept the thread from a file outside the
    confinement: readers wrap ``EACCES`` in errors of their own, HDF5 in its text, so the
    paths the error names are looked at. A file inside the folders its own permissions
    refuse keeps its error (a root-squashed NFS mount, say)."""
    chain: list[BaseException] = []  # the error, and those it was raised from or in
    cause: BaseException | None = error
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    texts = [str(e) for e in chain]
    if not any(isinstance(e, PermissionError) for e in chain) and not any(
        mark in text for text in texts for mark in ("Permission denied", "errno = 13")
    ):
        return error
    from calypso.registry.access.errors import AccessError
    from calypso.registry.access.links import resolved

    named = [getattr(e, "filename", None) for e in chain]
    found = (name.rstrip(".:") for text in texts for name in _PATH_IN_TEXT.findall(text))
    named += [name for name in found if os.path.lexists(name)]  # not an HDF5 path (/1.1)
    allowed = [resolved(f) for f in (*confinement.writable, *confinement.readable)]
    outside = [
        name
        for name in (str(n) for n in named if n)
        if not any(resolved(name).is_relative_to(folder) for folder in allowed)
    ]
    if not outside:
        return error
    return AccessError(
        f"refused: a file outside proposal {confinement.proposal} was not opened: {outside[0]} "
        "leads outside the proposal's folders (a file, folder or link changed since the "
        "check)"
    )


def proposal_confinement(settings: CalypsoSettings, path: str | Path | None) -> Confinement | None:
    """Where a run whose input (or part or output folder) is ``path`` may open files: its
    proposal's real folder (the proposal the path names under a data root, before
    symlinks), and the shared read-only folders. None where runs are not confined: no
    data roots, or a path under none of them (a staff run on one machine)."""
    from calypso.registry.access.confine import named_proposal
    from calypso.registry.access.links import resolved

    named = named_proposal(settings.data_roots, path) if path else None
    if named is None:
        return None
    shared = tuple(str(resolved(p)) for p in settings.access.shared_paths)
    return Confinement(named[0], (str(named[1]),), shared)


_kept_settings: list[tuple[object, CalypsoSettings]] = []  # the last settings read, by source


def current_settings() -> CalypsoSettings:
    """This process's settings, read again only when their sources changed (every chunk
    task asks: reading them takes ~1 ms). In a thread confined to a proposal, those read
    before it was confined (:func:`within` reads them first): the configuration file lies
    outside every proposal, so reading it there is refused, and a run's served threads
    failed at their write step wherever Calypso was configured by a file."""
    from calypso.config_file import config_file_path
    from calypso.settings import load_settings

    if _kept_settings and getattr(_here, "confinement", None) is not None:
        return _kept_settings[0][1]
    path = config_file_path()
    key = (
        sorted(item for item in os.environ.items() if item[0].startswith("CALYPSO_")),
        path and (str(path), path.stat().st_mtime_ns),
    )
    if not _kept_settings or _kept_settings[0][0] != key:
        _kept_settings[:] = [(key, load_settings())]
    return _kept_settings[0][1]


def in_proposal(place: str | Path | None, function: Callable[..., Result], *args: Any) -> Result:
    """``function(*args)`` confined to the proposal ``place`` lies in (a part or output
    folder, which the run's check put inside its input's proposal)."""
    return within(confinement_of(place), function, *args)


def confinement_of(place: str | Path | None) -> Confinement | None:
    """:func:`proposal_confinement` of ``place`` with this process's settings, on a worker
    that mounts the facility's paths elsewhere too (``CALYPSO_PATH_MAP``)."""
    from calypso.executors.paths import _path_map, translate

    mapping = _path_map()
    if mapping:  # the facility's paths, as the settings name the data roots
        place = translate(place, {target: source for source, target in mapping.items()})
    confinement = proposal_confinement(current_settings(), place)
    if confinement is not None and mapping:
        confinement = Confinement(
            confinement.proposal,
            tuple(translate(list(confinement.writable), mapping)),
            tuple(translate(list(confinement.readable), mapping)),
        )
    return confinement


Decorator = Callable[[Callable[..., Result]], Callable[..., Result]]


def confined_to_proposal(where: str = "work_dir") -> Decorator:
    """A task confined to the proposal its argument ``where`` lies in (a path, or
    ``plan.output_dir``: an attribute of an argument): :func:`in_proposal`."""
    name, _, attribute = where.partition(".")

    def decorate(function: Callable[..., Result]) -> Callable[..., Result]:
        import inspect

        signature = inspect.signature(function)

        @functools.wraps(function)
        def confined(*args: Any, **kwargs: Any) -> Result:
            bound = signature.bind(*args, **kwargs)
            place = bound.arguments.get(name)
            if attribute and place is not None:
                place = getattr(place, attribute, None)
            return in_proposal(place, functools.partial(function, *args, **kwargs))

        return confined

    return decorate
