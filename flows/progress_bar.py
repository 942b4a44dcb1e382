"""Progress on the terminal: what a run reports while it goes, and the bar that shows it.

Its own module, without pydantic or Prefect: ``calypso run`` draws it for a run sent to
``calypso serve`` before anything else is imported (:mod:`calypso.flows.online.submissions`).
"""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    """What a run reports while it goes: a terminal bar, or a command connected to the
    service (:mod:`calypso.flows.online.submissions`)."""

    def stage(self, text: str, *, started: bool = False) -> None: ...

    def update_to(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


def progress_bar(unit: str, stage: str) -> Progress:
    """A progress bar on the terminal (standard error) that first says ``stage``."""
    return TerminalBar(0, unit, stage=stage)


class TerminalBar:
    """A tqdm bar on standard error, fed ``(done, total)`` by a progress listener."""

    def __init__(self, total: int, unit: str, scale: bool = False, stage: str = "") -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            desc=stage or None,
            total=total,
            unit=unit,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
            file=sys.stderr,
            disable=None,  # none when standard error is not a terminal (logs, pipes)
            leave=False,
        )

    def stage(self, text: str, *, started: bool = False) -> None:
        """Say what is being done before the first result arrives; ``started``: the work
        itself starts now (the rate counts from here, not from the start-up)."""
        if self._bar.disable:  # standard error is not a terminal: nothing is drawn
            return
        if started:
            self._bar.reset(total=self._bar.total)
        self._bar.set_description_str(text or None, refresh=True)

    def update_to(self, done: int, total: int) -> None:
        if done and getattr(self._bar, "desc", None):  # a disabled bar has no description
            self._bar.set_description_str(None, refresh=False)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
