"""What every worker of a local cluster runs as it starts (a Dask preload module).

A worker that is closing can still be sending its heartbeat: when the cluster closes,
the connection goes from under it and distributed logs the failure with a traceback on
the user's terminal after a run that went well. Such a record, from a worker already
closing, says nothing: it is dropped. The same failure from a running worker is kept.
Its Prefect clients share one TLS context (:func:`calypso.flows.runtime.
share_prefect_tls_context`).

:func:`openmp_threads_for_this_task` and :func:`openmp_share` are for the tasks
themselves: OpenMP kernels (pyFAI's) in threads of a command's own cluster.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
# A local cluster's cores, in its worker processes' environment (executors/dask.py).
LOCAL_CORES = "CALYPSO_LOCAL_CORES"


class ClosingWorkerHeartbeat(logging.Filter):
    """Drops the heartbeat failure of a worker that is closing."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(HEARTBEAT_FAILED):
            return True
        from distributed.core import Status

        return self.worker.status not in {Status.closing, Status.closed, Status.closing_gracefully}


def dask_setup(worker: Any) -> None:
    from calypso.flows.runtime import share_prefect_tls_context

    worker._calypso_heartbeat_filter = ClosingWorkerHeartbeat(worker)
    logging.getLogger("distributed.worker").addFilter(worker._calypso_heartbeat_filter)
    share_prefect_tls_context()  # each task run's engine makes a Prefect client
    # What the preloaded modules warm in each worker, not in the fork server that imported
    # them (calypso.tasks.tomography): in a thread, the worker takes tasks meanwhile.
    for name, module in list(sys.modules.items()):
        warm_up = getattr(module, "warm_up_worker", None) if name.startswith("calypso.") else None
        if callable(warm_up):
            threading.Thread(target=warm_up, name=f"warm-up {name}", daemon=True).start()


def dask_teardown(worker: Any) -> None:
    # A worker of threads lives in a process that outlives it (a notebook's runs, each
    # with a cluster of its own): its filter goes with it, once it has closed. Removed
    # here, as the worker starts closing, it let the heartbeat failure through: distributed
    # tears the preloads down before it closes the connections a heartbeat may be using.
    kept = getattr(worker, "_calypso_heartbeat_filter", None)
    if kept is not None:
        import asyncio

        async def remove_once_closed() -> None:
            await worker.finished()
            logging.getLogger("distributed.worker").removeFilter(kept)

        worker._calypso_filter_removal = asyncio.get_running_loop().create_task(
            remove_once_closed()
        )


_thread = threading.local()
# A command's own cluster of threads (executors/dask.py: ``threaded``): the OpenMP threads
# its chunk tasks share (0: none, the tasks run in worker processes).
_shared = 0
_running = 0  # chunk tasks now integrating in this process's threads
_running_lock = threading.Lock()
_single_threaded: set[str] = set()  # OpenMP runtimes kept at one thread (their files)
_runtimes: list = []  # the OpenMP runtimes found last in this process


def share_cores(threads: int) -> None:
    """The task threads of this process (a command's own cluster of ``threads`` threads)
    share its cores: see :func:`openmp_share`."""
    global _shared
    _shared = threads * int(os.environ.get("OMP_NUM_THREADS") or 1)


def _set_openmp_threads(threads: int) -> None:
    if getattr(_thread, "openmp", None) == threads:
        return
    from threadpoolctl import ThreadpoolController

    global _runtimes
    # Every OpenMP runtime loaded now (a library may load its own later): a few per run.
    # In a thread confined to a proposal's folders /proc/self/maps may not open: the
    # runtimes found last then (setting a runtime's threads reads no file).
    with suppress(OSError):
        _runtimes = ThreadpoolController().select(user_api="openmp").lib_controllers
    if not _runtimes:
        return  # no OpenMP runtime loaded yet: set once the kernels have loaded one
    for runtime in _runtimes:
        runtime.set_num_threads(1 if runtime.filepath in _single_threaded else threads)
    _thread.openmp = threads


def keep_single_threaded(runtimes: Iterable[str]) -> None:
    """These OpenMP runtimes (their library files) keep one thread whatever share of the
    cores a task takes: a library whose parallel work is short (bitshuffle decompressing a
    frame in ~1.5 ms, :mod:`calypso.tasks.raw.stored_chunks`) gains little from two, and
    its idle thread spins on after each frame, beside pyFAI's kernel on the same cores."""
    _single_threaded.update(runtimes)


def openmp_threads_for_this_task() -> None:
    """Give the OpenMP kernels this thread runs (pyFAI's) ``OMP_NUM_THREADS`` threads, or
    one: the cores are shared out by Dask's threads and processes, one task a core.

    A worker process has ``OMP_NUM_THREADS`` from its start (:func:`calypso.executors.dask.
    worker_environment`), and this changes nothing there. The threads of a command's own
    cluster (:func:`calypso.executors.dask.local_cluster_options`, ``threaded``) run in
    the command, whose OpenMP runtime started with one thread a core: every task would
    start that many (600 frames on two cores: 42-50 frames/s against 47-55 with one).
    OpenMP's thread count is the calling thread's own, so each task thread sets it, once.
    """
    if getattr(_thread, "openmp", None) is None:
        _set_openmp_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))


def keep_one_share() -> None:
    """This thread keeps one share of the cores, whatever runs beside it, but counts as
    running (:func:`openmp_share`): a cold command's head start, which integrates beside
    Prefect's server as it starts."""
    _thread.fixed = True


@contextmanager
def openmp_share() -> Iterator[Callable[[], None]]:
    """While this thread runs a chunk task: a function to call before each frame, which
    gives the thread's OpenMP kernels its share of the cores now.

    In a command's own cluster of threads (:func:`share_cores`) the share is the cores
    over the chunk tasks running: one thread each while every task thread has a chunk,
    all of them to the last chunk once the others are done. Without it, a run's last
    chunk ran on one core with the other idle (a cold 600-frame run: ~2 s of its ~15 s).
    pyFAI's kernels give the same numbers bit for bit with any thread count (each bin is
    summed by one thread). A thread that keeps one share (:func:`keep_one_share`) counts
    as running. The worker processes of a local cluster share its cores the same way,
    across processes (:func:`_shared_across_processes`); elsewhere (a SLURM job, say)
    the count is :func:`openmp_threads_for_this_task`'s."""
    global _running
    if not _shared:
        with _shared_across_processes() as pace:
            yield pace
        return

    def pace() -> None:
        _set_openmp_threads(max(1, _shared // max(_running, 1)))

    with _running_lock:
        _running += 1
    try:
        if getattr(_thread, "fixed", False):
            openmp_threads_for_this_task()
            yield lambda: None
        else:
            pace()
            yield pace
    finally:
        with _running_lock:
            _running -= 1


@contextmanager
def _shared_across_processes() -> Iterator[Callable[[], None]]:
    """:func:`openmp_share` in a worker process of a local cluster: the cores it was given
    (``CALYPSO_LOCAL_CORES``, :func:`calypso.executors.dask.worker_environment`) over the
    chunk tasks integrating in its worker processes. Each holds a lock on a file of its own
    in a folder of this user's, and the count is the files whose lock is held: a worker
    killed mid-chunk lets its lock go with it. A served run's last chunk ran on one core
    with the other idle for 0.1-0.6 s; pyFAI's kernel takes 14 ms a frame on two
    threads against 21 ms on one. Without the setting, or without the folder, one share
    each, as the worker's own OpenMP setting says."""
    openmp_threads_for_this_task()
    own = int(os.environ.get("OMP_NUM_THREADS") or 1)
    cores = int(os.environ.get(LOCAL_CORES) or 0)
    folder = running_chunks_folder() if cores > own else None
    claim = _claim(folder) if folder is not None else None
    if folder is None or claim is None:
        yield lambda: None
        return
    held, mine = claim

    def pace() -> None:  # a count is ~13 us, a frame ~20 ms: counted before each frame
        running = _chunks_running(folder)
        _set_openmp_threads(max(own, cores // running) if running else own)

    try:
        yield pace
    finally:
        with suppress(OSError):
            mine.unlink()
        os.close(held)  # its lock released
        _set_openmp_threads(own)


def _claim(folder: Path) -> tuple[int, Path] | None:
    """A file of this chunk task's own in ``folder``, locked (its descriptor, its path);
    None where it cannot be made (the chunk then keeps its one share)."""
    name = f"{os.getpid()}-{threading.get_native_id()}-{uuid.uuid4().hex[:8]}"
    claimed = folder / f".{name}"  # not counted until it is locked and renamed
    try:
        held = os.open(claimed, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        os.rename(claimed, folder / name)
    except OSError:
        with suppress(OSError):
            claimed.unlink()
        os.close(held)
        return None
    return held, folder / name


def running_chunks_folder() -> Path | None:
    """The folder of this user's running chunk tasks (in memory where the machine has
    /dev/shm); None if it cannot be this user's own."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    folder = base / f"calypso-{os.getuid()}-running-chunks"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        status = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        return None  # another's, or a link to elsewhere: no sharing
    return folder


def scratch_folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder that a thread confined to a proposal may write too
    (:mod:`calypso.registry.access.landlock`): in this user's running-chunks folder,
    hidden from the count of chunks; the system's temporary folder where there is none."""
    return tempfile.TemporaryDirectory(prefix=f".{prefix}", dir=running_chunks_folder())


def _chunks_running(folder: Path) -> int:
    """The chunk tasks whose file in ``folder`` is locked, this one's included; a file
    nobody holds (its worker was killed) is removed. 0: the folder is gone, none known."""
    running = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            probe = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue  # just removed: that chunk is done
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running += 1
        except OSError:
            pass
        else:
            with suppress(OSError):
                os.unlink(entry.path)
        finally:
            os.close(probe)
    return running
