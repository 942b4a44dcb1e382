"""What a live run holds, and what a technique provides to be fed live (docs/live.md):
the pieces :mod:`calypso.flows.online.live` runs and each technique's module
(``live_diffraction.py``, ``live_mx.py``) fills in.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from calypso.errors import RawDataError

if TYPE_CHECKING:  # not imported: the watcher reads LIVE_TECHNIQUES without Prefect
    from calypso.flows.engine import StepContext

T = TypeVar("T")

# The techniques that can be fed live, and where their LiveTechnique is.
LIVE_TECHNIQUES = {
    "diffraction": "calypso.flows.online.live_diffraction:LiveDiffraction",
    "mx": "calypso.flows.online.live_mx:LiveMX",
    "spectroscopy": "calypso.flows.online.live_spectroscopy:LiveSpectroscopy",
    "tomography": "calypso.flows.online.live_tomography:LiveTomography",
}
# The techniques whose live run follows a whole dataset (its scans one after the other,
# the result once the dataset has ended): a rule with unit = "dataset" starts one at the
# dataset's first scan. The others follow one scan, so their dataset rules wait for the end.
LIVE_DATASETS = frozenset({"tomography"})
LIVE_CHUNK = 10  # frames: half a second of a 20 frames/s scan, ~1 s of work on one core

WAIT = object()  # what LiveTechnique.chunk_inputs says when a chunk's inputs are not all in


class MissingInputs(RawDataError):
    """A chunk can never be sent: the scan ended without what it needs (a counter's
    points). What came before it is reduced, marked partial."""


class PlanWaits(Exception):
    """A technique's plan needs more of the scan's frames than have come (a map whose first
    pixels are off the sample): the run follows the scan until more come, then plans again."""


@dataclass(frozen=True)
class FirstFrames:
    """What the scan's first frames and its dataset file say, for a technique's live plan."""

    raw_file: Path  # the Bliss dataset file being written
    number: int  # the scan
    detector: str
    lima_file: str  # the first Lima file, and its frames' dataset
    dataset: str
    frame_shape: tuple[int, ...]
    dtype: str
    npoints: int | None  # the frames the scan announced (blissdata), None: not said
    frames: int  # frames handed out so far
    title: str
    start_time: str | None


class LiveTechnique:
    """What one technique adds to the following of a scan (one instance a run: it may
    keep what it needs between its steps). Its results are chunk results of its own."""

    preload = ""  # the module its workers import (its live chunk task)
    doing = "Reducing"  # what the progress says it does ("Integrating scan 3 live")
    unit: str | None = None  # what its frames are, when not the technique's unit

    def warm_up(self, ctx: StepContext, parameters: Any) -> None:
        """Before the scan has begun: what the workers may build meanwhile (not waited for)."""

    def open_scan(
        self, live: LiveRun, raw_file: Path, scans: list[int] | None, parameters: Any
    ) -> tuple[Any, int, str]:
        """The scan in progress writing ``raw_file`` (a LiveScan), its number and detector:
        by default its Lima frames, from the stream server or the growing files."""
        from calypso.tasks.plans.live import open_live_scan

        return open_live_scan(
            live.source, raw_file, scans, getattr(parameters, "detector", None),
            key=live.key, stall_timeout=live.stall_timeout,
        )  # fmt: skip

    def plan(self, ctx: StepContext, parameters: Any, first: FirstFrames) -> Any:
        """The plan of the scan in progress, made as the offline planner makes it; raises
        :class:`PlanWaits` when it needs more frames."""
        raise NotImplementedError

    def meanwhile(self, ctx: StepContext, live: LiveRun, parameters: Any) -> None:
        """Called as the run waits for the scan's first frames, when none can come before
        its end (an XAS map scanned an energy at a time): what can be shown already."""

    def prepare(self, ctx: StepContext, live: LiveRun, plan: Any) -> None:
        """Before the first chunk is sent (the run's work folder is there)."""

    def chunk_inputs(self, live: LiveRun, plan: Any, first: int, stop: int, ended: bool) -> Any:
        """What chunk ``first:stop`` needs besides its frames (read by the flow): WAIT while
        it is not all there; :class:`MissingInputs` once the scan has ended without it."""
        return None

    def submit(
        self, ctx: StepContext, live: LiveRun, plan: Any, first: int, stop: int, inputs: Any
    ) -> Any:
        """The future of chunk ``first:stop``'s task."""
        raise NotImplementedError

    def span(self, result: Any) -> tuple[int, int]:
        """The frames ``(first, stop)`` of a chunk result."""
        raise NotImplementedError

    def write_partial(
        self, live: LiveRun, plan: Any, chunks: list[Any], path: Path, state: str
    ) -> None:
        """The partial result at ``path`` (written aside, then renamed)."""
        raise NotImplementedError

    def frames_in(self, final: Any, number: int) -> int | None:
        """Frames of scan ``number`` in the offline plan ``final`` (None: not in it)."""
        raise NotImplementedError

    def after_scan(self, ctx: StepContext, live: LiveRun) -> None:
        """Once the scan followed has ended well, before the offline plan is made: what
        else the result waits for (a tomography dataset's flats after its projections)."""

    def as_partial(self, live: LiveRun, plan: Any, frames: int) -> None:
        """Make ``plan`` that of the ``frames`` first frames of the scan (it did not end
        well): what the writer writes, marked partial."""
        raise NotImplementedError

    def partial_chunks(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> Any:
        """What the processing step gives when the scan did not end well (``plan`` made
        that of the frames that came by :meth:`as_partial`): by default its chunks."""
        return chunks

    def final_chunks(
        self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]
    ) -> list[Any]:
        """The live chunks as the offline plan ``plan`` has them, with the other scans of
        the dataset it names reduced as offline: what the writer takes."""
        raise NotImplementedError

    def figures(self, plan: Any, chunks: list[Any]) -> dict[str, Any]:
        """What the processing step reports of its chunks (as the offline step does)."""
        return {"tasks": len(chunks), "chunks": len(chunks)}

    def write(self, ctx: StepContext, live: LiveRun, plan: Any, *processed: Any) -> list[str]:
        """The offline writer, given what the steps before it gave (``live.partial``: why
        the result is partial, when it is)."""
        raise NotImplementedError


@dataclass
class LiveRun:
    """How one live run follows its scan, and what it saw (the steps of the run share it)."""

    source: str = "files"  # "files", or the blissdata server's redis:// URL
    key: str | None = None  # the blissdata scan key (default: the scan writing the input)
    poll: float = 0.1
    stall_timeout: float = 60.0  # no new frame for this long: the writer stopped
    latency: float = 0.5  # the longest a ready frame waits for its chunk to fill
    end_timeout: float = 10.0  # the stream closed: how long end_time may take to be written
    technique: Any = None  # the LiveTechnique of the run
    scan: Any = None  # the LiveScan, once found
    number: int = 0
    detector: str = ""
    dataset_file: str = ""
    partial: str | None = None  # why the result is partial, when it is
    look: Any = None  # the live quick look, when it began before the plan (LiveLook)
    handed: dict[int, float] = field(default_factory=dict)  # frame -> when it was ready
    timeline: list[tuple[int, int, float]] = field(default_factory=list)  # chunk, done at
    confinement: Any = None  # where the kernel keeps what the run opens (its proposal)

    def held(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` where the kernel keeps what it opens inside the
        run's proposal (:mod:`calypso.registry.access.landlock`), as the chunk tasks."""
        from calypso.registry.access.landlock import within

        return within(self.confinement, function, *args, **kwargs)

    def hold(self, scan: Any) -> HeldScan:
        """``scan`` (a LiveScan) with every look at its files held inside the proposal."""
        return HeldScan(scan, self)


class HeldScan:
    """A live scan whose every look (its frames counted, its counters, its end: the flow's
    own polling of files being written) is made where the kernel keeps it inside the
    run's proposal: a file swapped for a link into another proposal during the scan is
    not opened, as the chunk tasks do not open it."""

    def __init__(self, scan: Any, run: LiveRun) -> None:
        self._scan, self._run = scan, run

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy's and pickle's questions, before __init__ ran too
            raise AttributeError(name)
        value = self._run.held(getattr, self._scan, name)  # a property may read the files
        if inspect.ismethod(value):
            return functools.partial(self._run.held, value)
        return value
