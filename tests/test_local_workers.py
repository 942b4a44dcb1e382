"""A command's local Dask workers are forked from one process that imported their code once
(executors/fork_server.py), with the environment they need as they start; where that
process is another's, they start afresh as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Run in a process of its own: a process has one fork server, given to its first user.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from distributed import Client
    from calypso.executors.dask import boot_local_cluster
    from calypso.settings import ExecutorSettings

    def probe():
        return {
            "parent": os.getppid(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "cores": os.environ.get("CALYPSO_LOCAL_CORES"),
            "other": os.environ.get("CALYPSO_TEST_OTHER"),
            "imported": "calypso.tasks.diffraction" in sys.modules,
        }

    def workers(executor):
        cluster = boot_local_cluster(executor).result()
        try:
            with Client(cluster) as client:
                return list(client.run(probe).values())
        finally:
            cluster.close()

    if __name__ == "__main__":
        executor = ExecutorSettings(n_workers=2, preload=["calypso.tasks.diffraction"])
        first = workers(executor)
        again = workers(executor)  # the same settings: the same fork server
        os.environ["CALYPSO_TEST_OTHER"] = "1"  # other settings in the same process
        other = workers(executor)
        print(json.dumps({"pid": os.getpid(), "first": first, "again": again, "other": other}))
    """
)


def test_local_workers_are_forked_from_one_process_unless_it_is_anothers(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    pid = seen["pid"]
    for name in ("first", "again", "other"):
        assert len(seen[name]) == 2
        for worker in seen[name]:  # what a worker needs from its first instruction on
            assert worker["omp"] == "1" and worker["malloc"] == str(1 << 30), worker
            assert worker["cores"] == "2", worker  # the cluster's, its chunks share out
            assert worker["imported"], worker
    fork_servers = {worker["parent"] for worker in seen["first"] + seen["again"]}
    assert len(fork_servers) == 1 and pid not in fork_servers  # one fork server, not the caller
    # A fork server has the environment it started with: other settings start afresh.
    assert {worker["parent"] for worker in seen["other"]} == {pid}
    assert all(worker["other"] == "1" for worker in seen["other"])


def pyfai_openmp_threads() -> set[int]:
    """The calling thread's thread counts of GCC's libgomp, pyFAI's OpenMP runtime (one copy
    or several: wheels bring their own). Only that one: another runtime may be loaded in
    this process too (Intel's, with MKL through Larch, starts lazily and reads
    OMP_NUM_THREADS as it does), and pyFAI's kernels are what the count is for."""
    return {count for path, count in libgomp_threads() if "bitshuffle" not in path.parent.name}


def libgomp_threads() -> list[tuple[Path, int]]:
    """(where, thread count) of each copy of GCC's libgomp loaded, for the calling thread."""
    from threadpoolctl import ThreadpoolController

    return [
        (Path(info["filepath"]), info["num_threads"])
        for info in ThreadpoolController().info()
        if info["user_api"] == "openmp" and info["prefix"] == "libgomp"
    ]


def test_frames_are_decompressed_on_one_thread_whatever_the_share():
    """bitshuffle's own OpenMP runtime (frames read as stored) keeps one thread when a
    chunk task takes two for pyFAI: its idle thread would spin beside pyFAI's kernel."""
    import pyFAI.ext.splitBBoxCSR  # noqa: F401  (loads pyFAI's runtime)

    import calypso.tasks.raw.stored_chunks  # noqa: F401  (and bitshuffle's)
    from calypso.executors import worker_setup

    def counts(threads: int) -> dict[str, int]:
        worker_setup._set_openmp_threads(threads)
        return {path.parent.name: count for path, count in libgomp_threads()}

    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(counts, 2).result()
    assert seen["bitshuffle.libs"] == 1, seen
    assert set(seen.values()) == {1, 2}, seen  # pyFAI's runtime took the two


def test_a_task_thread_runs_openmp_kernels_on_its_own_core(monkeypatch):
    """Threads of a command's own cluster share the command's OpenMP runtime, started with
    one thread a core: each task thread sets its own count, once (OMP_NUM_THREADS, or 1)."""
    import pyFAI.ext.splitBBoxCSR  # noqa: F401  (pyFAI's OpenMP runtime, loaded)

    from calypso.executors.worker_setup import openmp_threads_for_this_task

    def openmp_threads(setting: str | None) -> set[int]:
        if setting is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", setting)
        openmp_threads_for_this_task()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # read once: a later change is not seen
        openmp_threads_for_this_task()
        return pyfai_openmp_threads()

    with ThreadPoolExecutor(1) as pool:
        assert set(pool.submit(openmp_threads, None).result()) == {1}
    with ThreadPoolExecutor(1) as pool:
        assert set(pool.submit(openmp_threads, "2").result()) == {2}


def test_the_last_chunk_tasks_get_the_cores_the_others_left(monkeypatch):
    """In a command's own cluster of threads, a chunk task's OpenMP kernels get the cores
    over the chunk tasks running, frame by frame: one each while both threads integrate,
    both to the one left once the other is done (a run's last chunk no longer runs on one
    core with the other idle). The head start keeps one but counts."""
    import threading
    import time

    import pyFAI.ext.splitBBoxCSR  # noqa: F401  (pyFAI's OpenMP runtime, loaded)

    from calypso.executors import worker_setup

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(worker_setup, "_shared", 0)
    worker_setup.share_cores(2)

    def threads_now() -> int:
        [count] = pyfai_openmp_threads()
        return count

    step = [threading.Event() for _ in range(6)]
    seen: dict[str, int] = {}

    def last_task():
        with worker_setup.openmp_share() as pace:
            seen["alone"] = threads_now()
            step[0].set()
            step[1].wait(10)  # the other task has begun
            pace()
            seen["beside another"] = threads_now()
            step[2].set()
            step[3].wait(10)  # the other task is done
            pace()
            seen["left alone"] = threads_now()
            step[4].set()
            step[5].wait(10)  # the head start has begun
            pace()
            seen["beside the head start"] = threads_now()

    def other_task():
        step[0].wait(10)
        with worker_setup.openmp_share():
            seen["other"] = threads_now()
            step[1].set()
            step[2].wait(10)
        step[3].set()

    def head_start():
        step[4].wait(10)
        worker_setup.keep_one_share()
        with worker_setup.openmp_share():
            seen["head start"] = threads_now()
            step[5].set()
            time.sleep(0.5)

    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(f) for f in (last_task, other_task, head_start)]:
            future.result(timeout=30)
    assert seen == {
        "alone": 2,
        "other": 1,
        "beside another": 1,
        "left alone": 2,
        "head start": 1,
        "beside the head start": 1,
    }
    assert worker_setup._running == 0


# A chunk task in another worker process of the same cluster, holding its share until
# its input closes (or it is killed).
OTHER_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import calypso.executors.worker_setup as worker_setup
    worker_setup.running_chunks_folder = lambda: Path(sys.argv[1])
    with worker_setup.openmp_share():
        print("integrating", flush=True)
        sys.stdin.readline()
    """
)


def test_a_local_clusters_worker_processes_share_its_cores_chunk_by_chunk(monkeypatch, tmp_path):
    """Worker processes of a local cluster (a served run's, a kept cluster's) share its
    cores as a command's threads do: one OpenMP thread each while both integrate, both
    cores to the last chunk once the other process is done, or killed mid-chunk."""
    import pyFAI.ext.splitBBoxCSR  # noqa: F401  (pyFAI's OpenMP runtime, loaded)

    from calypso.executors import worker_setup

    folder = tmp_path / "running"  # this test's own: other tests' chunks run meanwhile
    folder.mkdir()
    monkeypatch.setattr(worker_setup, "_shared", 0)  # a worker process, not a command's
    monkeypatch.setattr(worker_setup, "running_chunks_folder", lambda: folder)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CALYPSO_LOCAL_CORES", "2")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def other_worker() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", OTHER_WORKER, str(folder)],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "integrating"
        return process

    def threads_now() -> int:
        [count] = pyfai_openmp_threads()
        return count

    def chunk() -> dict[str, int]:
        seen = {}
        with worker_setup.openmp_share() as pace:
            pace()
            seen["alone"] = threads_now()
            other = other_worker()
            pace()
            seen["beside another process"] = threads_now()
            other.communicate("done\n", timeout=60)
            pace()
            seen["left alone"] = threads_now()
            other = other_worker()
            pace()
            seen["beside another again"] = threads_now()
            other.kill()  # mid-chunk: its lock goes with it
            other.wait()
            pace()
            seen["the other killed"] = threads_now()
        seen["after the chunk"] = threads_now()
        return seen

    with ThreadPoolExecutor(1) as pool:  # a task thread of its own, as a worker's
        seen = pool.submit(chunk).result(timeout=120)
    assert seen == {
        "alone": 2,
        "beside another process": 1,
        "left alone": 2,
        "beside another again": 1,
        "the other killed": 2,
        "after the chunk": 1,
    }
    assert list(folder.iterdir()) == []  # the killed one's file removed, ours too


def test_pyfai_gives_the_same_patterns_with_any_openmp_thread_count():
    """What sharing the cores out frame by frame relies on: a frame's pattern does not
    depend on how many OpenMP threads integrate it (each bin is summed by one thread)."""
    from threadpoolctl import threadpool_limits

    from calypso.techniques.diffraction import integrate_frames, make_integrator
    from tests.test_diffraction_technique import GEOMETRY, rings

    frames = rings(frames=3)
    integrator = make_integrator(GEOMETRY)
    results = {}
    for threads in (1, 2, 1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            results[threads] = integrate_frames(frames, integrator, npt=800, error_model="poisson")
        if threads == 2:
            np.testing.assert_array_equal(results[2].intensity, results[1].intensity)
            np.testing.assert_array_equal(results[2].errors, results[1].errors)


# A fork server that imported the tomography tasks, and a worker forked from it that
# reconstructs: in a process of its own (a process has one fork server).
FORKED_TOMOGRAPHY = textwrap.dedent(
    """
    import multiprocessing
    import numpy as np

    def back_project(_):
        from calypso.techniques import tomography as tomo

        kernel = tomo.back_projection_kernel()
        angles = np.linspace(0, 3, 8).astype(np.float32)
        return float(kernel(np.ones((8, 16), np.float32), angles, np.float32(8), False).sum())

    if __name__ == "__main__":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["calypso.tasks.tomography"])
        with context.Pool(1) as pool:
            print(pool.map_async(back_project, [0]).get(timeout=60))
    """
)


def test_workers_forked_after_the_tomography_tasks_were_imported_reconstruct(tmp_path):
    """The tomography tasks ran numba's parallel kernel as they were imported (to compile
    it): in a kept cluster's fork server, which imports every technique's tasks, that
    started numba's OpenMP threads, and each worker forked from it died at its first slab
    ("fork() called from a process already using GNU OpenMP"; KilledWorker, then later
    commands waited for workers that never came). The kernel is compiled in each worker."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED_TOMOGRAPHY)
    env = dict(os.environ, NUMBA_NUM_THREADS="1")  # as in Calypso's Dask workers
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().startswith("["), done.stderr[-2000:]
    assert "GNU OpenMP" not in done.stderr


def test_a_heartbeat_failing_as_its_worker_closes_says_nothing_and_the_filter_goes():
    """distributed tears a worker's preloads down before it closes the connections its
    heartbeat may be using: the filter, removed there, let "Failed to communicate with
    scheduler during heartbeat" and its traceback through after a run that went well (a
    served run's Ctrl-C, under load). A preload torn down after Calypso's logs it here."""
    import logging

    from distributed import LocalCluster

    from calypso.executors.worker_setup import ClosingWorkerHeartbeat

    late = (
        "import logging\n"
        "def dask_teardown(worker):\n"
        "    try:\n"
        "        raise OSError('Stream is closed')\n"
        "    except OSError:\n"
        "        logging.getLogger('distributed.worker').exception(\n"
        "            'Failed to communicate with scheduler during heartbeat.')\n"
    )
    seen: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("distributed.worker")
    logger.addHandler(handler)
    try:
        # torn down in reverse: Calypso's first, then the late one
        preload = [late, "calypso.executors.worker_setup"]
        with LocalCluster(n_workers=1, processes=False, preload=preload, dashboard_address=None):
            assert any(isinstance(f, ClosingWorkerHeartbeat) for f in logger.filters)
    finally:
        logger.removeHandler(handler)
    assert not [message for message in seen if "heartbeat" in message], seen
    assert not any(isinstance(f, ClosingWorkerHeartbeat) for f in logger.filters)
