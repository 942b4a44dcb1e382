"""Where a command's run is done: the Prefect API it reports to (one started now, the
home's local server, or the one ``PREFECT_API_URL`` names) and the Dask cluster its tasks
go to (the command's own, the home's kept one, or the configured one), with the progress
bar that says which is starting until the first result."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, closing
from typing import TYPE_CHECKING, Any

from calypso.flows.progress_bar import Progress, TerminalBar
from calypso.flows.startup import collect_from_now_on

if TYPE_CHECKING:
    from concurrent.futures import Future

    from calypso.flows.prefect_api import ServerStart
    from calypso.settings import CalypsoSettings


def run_on_cluster(
    settings: CalypsoSettings,
    total: int,
    unit: str,
    call: Callable[[Any], Any],
    bar: Progress | None = None,
    in_process: bool = False,
    api: ServerStart | None = None,
    threaded: bool = False,
    head_start: Callable[[], Any] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Any:
    """``call(task_runner)`` with a Prefect API up (the one ``api`` began, else the
    configured one or one started now), on the Dask cluster the settings name (a local
    one boots while Prefect starts), a progress bar counting ``unit`` (``bar``, or a new
    one) that says what is starting until the first result. ``in_process``: the plan's
    work is too small for a cluster; its tasks run in this process's threads.
    ``threaded``: a cluster of this command's own is one worker of threads in this
    process (the technique's ``threaded_chunks``); a kept cluster is not. While the Prefect
    server this command began starts, ``head_start()`` (a context manager, or None) begins
    the run's chunks in a thread when they are to run in this process's threads
    (:mod:`calypso.tasks.head_start`), and ``meanwhile()`` runs."""
    import os

    from calypso.executors import boot_local_cluster, build_task_runner
    from calypso.executors.dask import (
        boot_kept_cluster,
        in_threads,
        keeps_cluster,
        kept_task_runner,
        require_scheduler,
    )
    from calypso.flows.prefect_api import prefect_api
    from calypso.flows.runtime import check_prefect_api, prefect_api_secret
    from calypso.flows.techniques import preloading_every_technique
    from calypso.tasks.progress import listening

    with ExitStack() as stack:
        if bar is None:
            bar = stack.enter_context(closing(TerminalBar(total, unit)))
        check_prefect_api()
        kept = not in_process and keeps_cluster(
            settings.executor,
            bool(os.environ.get("PREFECT_API_URL")) or settings.server.local_keep_s > 0,
        )
        # One kept cluster for every technique: its workers import them all.
        every = preloading_every_technique(settings) if kept else settings
        # Chunks that can run in this command's threads do so (with the head start while
        # Prefect's server starts) unless the kept cluster runs already, started by a
        # command whose chunks need worker processes. Started for them, its workers'
        # imports took the cores of the run (a new home's first 600-frame command: 14.4-18.1
        # s against 10.7-12.2 s in its threads); started after it, those of the next
        # command (14.1-19.9 s against 9.6-12.8 s). Warm, it takes a later command's
        # chunks ~3% sooner than its threads do (medians 10.27 s against 10.55 s).
        if kept and in_threads(settings.executor, threaded):
            kept = _kept_runs(every, api)
        booting = None if in_process or kept else boot_local_cluster(settings.executor, threaded)
        if kept:
            settings = every
        kept_booting: list[Future] = []

        def boot_kept(api_url: str) -> None:  # as soon as the Prefect API's address is known
            secret = prefect_api_secret(settings)
            kept_booting.append(
                boot_kept_cluster(settings.executor, settings.home, api_url, secret)
            )

        if kept and os.environ.get("PREFECT_API_URL"):
            boot_kept(os.environ["PREFECT_API_URL"])
        if booting is not None:  # closed even if the Prefect API never comes up
            stack.callback(_close_cluster, booting)
        starting = api is not None and api.pending()
        own_threads = booting is not None and in_threads(settings.executor, threaded)
        if starting and own_threads and head_start is not None:
            begun = head_start()  # the chunk tasks run in this process: they can take them
            if begun is not None:
                stack.enter_context(begun)
        if starting and meanwhile is not None:
            meanwhile()
        if os.environ.get("PREFECT_API_URL"):
            stage = "connecting to Prefect"
        elif settings.server.local_keep_s == 0:
            stage = "starting a temporary Prefect server"
        else:
            stage = "finding or starting the local Prefect server"
        bar.stage(stage + (" and Dask workers" if booting is not None else ""))
        api_url = stack.enter_context(prefect_api(settings, boot_kept if kept else None, api))
        if booting is not None:  # ... and normally before the API goes: workers flush logs to it
            stack.callback(_close_cluster, booting)
            bar.stage("starting Dask workers")
        stack.enter_context(listening(bar.update_to))
        if in_process:
            from prefect.task_runners import ThreadPoolTaskRunner

            runner = ThreadPoolTaskRunner(max_workers=1)
        elif kept:
            bar.stage("finding or starting the local Dask cluster")
            if not kept_booting:  # the local server was found running
                boot_kept(api_url)
            runner, release = kept_task_runner(settings.executor, settings.home, kept_booting[0])
            stack.callback(release)
        else:
            require_scheduler(settings.executor)  # one line, not Dask's traceback in 30 s
            runner = build_task_runner(settings.executor, booting.result() if booting else None)
        bar.stage("running", started=True)
        collect_from_now_on()  # the command's start-up is done: :mod:`calypso.flows.startup`
        return call(runner)


def _kept_runs(settings: CalypsoSettings, api: ServerStart | None) -> bool:
    """Whether the kept local cluster for ``settings`` runs, for the Prefect API that
    ``PREFECT_API_URL`` names or ``api`` found running (one this command is starting has
    no cluster yet)."""
    import os

    from calypso.executors.dask import kept_cluster_runs

    url = os.environ.get("PREFECT_API_URL")
    if not url and api is not None and not api.pending():
        url = api.url
    return bool(url) and kept_cluster_runs(settings.executor, settings.home, url)


def _close_cluster(booting: Future) -> None:
    booting.result().close()  # closing twice is harmless
