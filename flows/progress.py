"""Progress of a flow run: a Prefect progress artifact, and a bar when run from the CLI.

The CLI installs a listener for the duration of the run; the flow reports to
whatever is installed (nothing, by default). The listeners are a process-wide
list, not a context variable: Prefect runs the flow function in a context of
its own, where the CLI's context variables are not set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from prefect.futures import PrefectFuture, as_completed

from calypso.tasks.progress import RunProgress, listening

__all__ = ["RunProgress", "collect", "listening"]

Result = TypeVar("Result")


def collect(
    futures: Iterable[PrefectFuture[Result]],
    total: int,
    description: str,
    size: Callable[[Result], int],
) -> list[Result]:
    """Results of submitted tasks as they finish, reporting ``size(result)`` units each."""
    progress = RunProgress(total, description)
    results = []
    for future in as_completed(list(futures)):
        result = future.result()
        results.append(result)
        progress.advance(size(result))
    return results
