"""The task runner a flow gets when no caller chooses one.

Runs started by a deployment (``calypso serve``, a work pool) get the flow's own task
runner: Prefect loads the flow and calls it. Commands choose theirs per run
(:func:`calypso.flows.command_cluster.run_on_cluster`), and a few spectra run in the command's own
threads. The flow's default is therefore built only when a run uses it: importing a
flow must not import Dask's ``distributed`` and ``prefect_dask`` (~0.3 s of a one-spectrum
command that never touches Dask).
"""

from __future__ import annotations

from typing import Any, NoReturn

from prefect.task_runners import TaskRunner

from calypso.settings import ExecutorSettings


class DaskWhenRun(TaskRunner):
    """A ``DaskTaskRunner`` for ``executor``, built when a flow run starts: Prefect runs a
    flow's tasks on ``task_runner.duplicate()``, never on the flow's runner itself."""

    def __init__(self, executor: ExecutorSettings) -> None:
        super().__init__()
        self.executor = executor

    def duplicate(self) -> TaskRunner:  # type: ignore[override]  # the runner that runs
        from calypso.executors.dask import build_task_runner

        return build_task_runner(self.executor)

    def submit(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("tasks run on this runner's duplicate(), as Prefect's engine does")


def flow_task_runner(preload: list[str] | None = None) -> TaskRunner:
    """The task runner of a flow whose caller chooses none. Local workers import
    ``preload`` (the technique's chunk tasks) as they start, unless the settings name
    modules of their own.

    Read from the settings when the flow is made: ``calypso serve`` points its flow runs
    at the cluster it keeps (``CALYPSO_EXECUTOR__KIND=address``).
    """
    from calypso.settings import load_settings

    executor = load_settings().executor
    if preload and executor.preload == ExecutorSettings().preload:
        executor = executor.model_copy(update={"preload": preload})
    return DaskWhenRun(executor)
