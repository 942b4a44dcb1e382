"""Live reduction (issue #19, docs/live.md): a technique's flow fed while the scan runs.

The technique's built-in specification (plan, one processing step, write) runs on the one
engine with its three steps fed by a scan in progress
(:class:`~calypso.tasks.raw.live.LiveScan`: blissdata streams or growing Lima files).
What is the same for every technique is here; what a technique adds (its plan, its chunk
task, its partial file, its writer) is a :class:`LiveTechnique` of its own module
(``live_diffraction.py``, ``live_mx.py`` beside this one):

- ``plan`` waits for the scan and its first frames, then plans as the offline planner
  does (geometry, output folder, checks) and claims the run (same exactly-once keys);
- the processing step submits chunks as frames become wholly available (a chunk is sent
  once it is full, or once its first frame has waited ``latency`` seconds), rewrites the
  partial file ``<result>.partial.h5`` as chunks finish (at most every second, and once
  more when the last chunk is in), reads the rest from the Lima files when the stream
  server goes away, and once the scan has ended plans again offline: from there on the
  plan and the chunks are the offline run's;
- ``write`` is the offline writer, so the result is the offline one bit for bit and is
  registered once. A scan that was aborted, or stopped without ``end_time``, gives the
  frames it has, marked partial (``status`` attributes and a warning), never a result
  that looks complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.flows.engine import (
    StepContext,
    builtin_specification,
    plan_in_proposal,
    run_specification,
    with_task_runner,
)
from calypso.flows.online.live_base import (
    LIVE_TECHNIQUES,
    WAIT,
    FirstFrames,
    LiveRun,
    LiveTechnique,
    MissingInputs,
    PlanWaits,
)
from calypso.flows.techniques import OUTPUTS, TECHNIQUES, Step, all_steps
from calypso.registry.access.landlock import proposal_confinement
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.live import entry_texts, wait
from calypso.tasks.raw import bliss
from calypso.tasks.raw.lima_saving import (
    LIMA_DATASET,
    frame_type,
    open_lima,
)

logger = logging.getLogger(__name__)


@dataclass
class _Chunks:
    """The chunks of one live run: out, finished, and where sending stopped for good."""

    futures: list[Any] = field(default_factory=list)
    done: list[Any] = field(default_factory=list)
    submitted: int = 0  # frames sent
    waited_since: float | None = None  # when the next chunk's first frame was ready
    limit: int | None = None  # frames past this are never sent (their inputs never came)
    error: CalypsoError | None = None  # why following stopped before the scan's end


_RUNS: dict[str, LiveRun] = {}  # the live run of each input followed in this process
LAST_TIMELINE: list[dict[str, Any]] = []  # the last run's (benchmarks read it)


def live_technique(technique: str) -> LiveTechnique:
    """A new :class:`LiveTechnique` of ``technique``, or a ParameterError naming those
    that can be fed live."""
    if technique not in LIVE_TECHNIQUES:
        raise ParameterError(
            f"live reduction of {technique}: only {', '.join(LIVE_TECHNIQUES)} so far; run "
            f"it offline once the scan has ended (calypso run {technique} RAW)"
        )
    module, name = LIVE_TECHNIQUES[technique].split(":")
    return getattr(import_module(module), name)()


def live_steps(technique: str) -> dict[str, Step]:
    """Every step, with the given technique's plan, first processing step and write step
    fed live; the steps between them run as offline, once the scan has ended."""
    live_technique(technique)  # refuses the techniques not live yet
    steps = dict(all_steps())
    processing = False
    for step in TECHNIQUES[technique].steps:
        role = "plan" if step.takes_parameters else "write" if step.output == OUTPUTS else None
        if role is None and not processing:
            role, processing = "process", True
        if role is not None:
            steps[step.name] = replace(step, run_at=f"{__name__}:live_{role}")
    return steps


def _count(ctx: StepContext, plan: Any) -> int:
    """The units the run's record counts in ``plan`` (frames, spectra, slices)."""
    return getattr(plan, TECHNIQUES[ctx.run.technique].count_attribute)


def _unit(ctx: StepContext, technique: LiveTechnique) -> str:
    """What the frames followed are called (projections, frames, spectra)."""
    return technique.unit or TECHNIQUES[ctx.run.technique].unit


# -- the steps ------------------------------------------------------------------------


def live_plan(ctx: StepContext, parameters: BaseModel) -> Any:
    """Wait for the scan and its first frames; plan it as offline; claim the run."""
    from calypso.tasks.raw.data_policy import RawDataset

    live = _RUNS[ctx.raw]
    path = Path(ctx.raw).expanduser().absolute()
    is_file = path.suffix in (".h5", ".hdf5", ".nxs")
    raw_file = path if is_file else RawDataset.from_path(path).raw_file
    live.dataset_file = str(raw_file)
    # What the flow itself opens of the scan being written (the files polled, counters,
    # the first frame, the plan's reads) is held inside the proposal by the kernel, as
    # the chunk tasks are: a file swapped since the run was checked is not opened.
    live.confinement = proposal_confinement(ctx.settings, ctx.raw)
    live.technique.warm_up(ctx, parameters)  # while the scan has not begun
    scan, live.number, live.detector = live.held(
        live.technique.open_scan, live, raw_file, ctx.scans, parameters
    )
    live.scan = live.hold(scan)
    # The first frames say the frames' shape and type; the stall time-out names a Lima
    # file that never appears. A map scanned an energy at a time has its first spectra at
    # its end: its own stall time-out (no energy point for that long) bounds the wait.
    # The stream server gone before them: the Lima files (live.scan is then theirs).
    deadline, announced = time.monotonic() + live.stall_timeout + 1, False
    while not (_follow_ranges_or_files(live) or live.scan.frames):
        if live.scan.finished:
            raise RawDataError(f"scan {live.number} ended without a frame")
        if getattr(live.scan, "whole_at_end", False):
            deadline = time.monotonic() + live.stall_timeout + 1
            if not announced:  # in the run's log: why nothing comes before the end
                from prefect import get_run_logger

                get_run_logger().info(
                    "scan %s is scanned an energy at a time: every spectrum is whole only at "
                    "its end, when it is reduced", live.number
                )  # fmt: skip
                announced = True
            live.technique.meanwhile(ctx, live, parameters)
        if time.monotonic() > deadline:
            raise RawDataError(f"no frame came within {live.stall_timeout + 1:.0f} s")
        time.sleep(0.1)
    scan = live.scan
    if not live.detector:
        live.detector = scan.info.detectors[0].split(":")[0]
    first_file, dataset, _, _ = scan.locations(0, 1)[0]
    frame_shape, dtype = live.held(frame_type, first_file, dataset)
    title, start_time = live.held(entry_texts, raw_file, live.number)
    first = FirstFrames(
        raw_file=raw_file, number=live.number, detector=live.detector, lima_file=first_file,
        dataset=dataset or LIMA_DATASET, frame_shape=tuple(frame_shape), dtype=dtype,
        npoints=scan.info.npoints, frames=scan.frames, title=title or scan.info.name,
        start_time=start_time,
    )  # fmt: skip
    while True:
        try:
            plan = live.held(live.technique.plan, ctx, parameters, first)
            break
        except PlanWaits:  # until more frames have come (a stalled scan raises)
            frames = live.scan.frames
            while live.scan.frames == frames and not live.scan.finished:
                _follow_ranges_or_files(live)
                time.sleep(0.1)
    ctx.run.planned(plan, _count(ctx, plan))
    return plan


def _follow_ranges_or_files(live: LiveRun) -> int:
    """:func:`_follow_ranges`, from the Lima files once the stream server has gone (before
    the first frames: the run ended there, though the files hold them)."""
    try:
        return _follow_ranges(live)
    except RawDataError as exc:
        if _fall_back(live, exc) is not None:
            raise
        return _follow_ranges(live)


def _follow_ranges(live: LiveRun) -> int:
    """New frames of the scan, their time noted; how many."""
    count = 0
    for first, stop in live.scan.ready():
        now = time.time()
        for index in range(first, stop):
            live.handed[index] = now
        count += stop - first
    return count


def live_process(ctx: StepContext, plan: Any) -> list[Any]:
    """Chunks submitted as the scan's frames come; the offline plan once it has ended."""
    from calypso.tasks.live_common import partial_path
    from calypso.tasks.progress import RunProgress
    from calypso.tasks.writers.live_look import LiveLook

    live = _RUNS[ctx.raw]
    technique: LiveTechnique = live.technique
    unit = _unit(ctx, technique)
    live.held(technique.prepare, ctx, live, plan)
    progress = RunProgress(plan.n_frames, f"{technique.doing} scan {live.number} live")
    partial = partial_path(plan.output_file)
    look = live.look or LiveLook(f"scan {live.number} {live.detector}", live.confinement)
    sent = _Chunks()
    written_at, shown = 0.0, 0
    while True:
        try:
            if sent.error is None:
                _follow_ranges(live)
            ended = live.scan.finished or sent.error is not None
            _send_ready(ctx, live, plan, sent, ended)
        except RawDataError as exc:
            if sent.error is not None:
                raise
            # The stream server went away: the Lima files from here on; any other error
            # (the writer stopped): what came is reduced, marked partial.
            sent.error = _fall_back(live, exc)
            continue
        _harvest(sent, live, progress)
        ready = live.scan.frames if sent.limit is None else sent.limit
        sending_done = ended and sent.submitted >= ready
        over = sending_done and not sent.futures
        # The partial file at most every second, and once more when the last chunk is in
        # (the beamline may wait for it: an MX grid's centring cell).
        if len(sent.done) > shown and (over or time.monotonic() - written_at > 1.0):
            frames = sum(b - a for a, b in map(technique.span, sent.done))
            total = max(plan.n_frames, live.scan.frames)
            state = f"running: {frames} of {total} {unit} done"
            live.held(technique.write_partial, live, plan, sent.done, partial, state)
            written_at, shown = time.monotonic(), len(sent.done)
            if not over:  # the result's own quick look comes next
                look.show(partial, state)
        if over:
            break
        time.sleep(0.02 if sending_done else live.poll)
    look.close(f"The scan has ended ({unit} reduced as they came): the result's quick look "
               "is among this run's artifacts.")  # fmt: skip
    written = _finish(ctx, plan, live, sent.done, sent.error, progress)
    LAST_TIMELINE[:] = [
        {"start": a, "stop": b, "ready": live.handed[a], "ready_last": live.handed[b - 1],
         "done": t}
        for a, b, t in live.timeline
    ]  # fmt: skip
    lags = [t - live.handed[i] for a, b, t in live.timeline for i in range(a, b)]
    ctx.report(
        **technique.figures(plan, sent.done),
        live_lag_p50_s=round(float(np.percentile(lags, 50)), 3) if lags else None,
        live_lag_p95_s=round(float(np.percentile(lags, 95)), 3) if lags else None,
        partial=live.partial,
    )
    return written


def _send_ready(ctx: StepContext, live: LiveRun, plan: Any, sent: _Chunks, ended: bool) -> None:
    """Submit the chunks whose frames (and inputs) are all there: a full chunk, or a short
    one once its first frame has waited ``latency`` s or the scan has ended."""
    technique: LiveTechnique = live.technique
    ready = live.scan.frames if sent.limit is None else sent.limit
    while sent.submitted < ready:
        first = sent.submitted
        stop = min(first + plan.chunk_size, ready)
        sent.waited_since = sent.waited_since or live.handed[first]
        young = time.time() - sent.waited_since < live.latency
        if stop - first < plan.chunk_size and not ended and young:
            return  # a short chunk waits a little for more frames
        try:
            inputs = live.held(technique.chunk_inputs, live, plan, first, stop, ended)
        except MissingInputs as exc:  # never: what came before it is reduced
            sent.error, sent.limit = sent.error or exc, first
            return
        if inputs is WAIT:
            return
        sent.futures.append(technique.submit(ctx, live, plan, first, stop, inputs))
        sent.submitted, sent.waited_since = stop, None


def _fall_back(live: LiveRun, error: RawDataError) -> RawDataError | None:
    """The stream server went away mid-scan: the same scan's Lima files from here on (no
    frame lost, none twice), and no error; any other error stays."""
    from calypso.tasks.raw.live_streams import StreamServerGone

    if not isinstance(error, StreamServerGone):
        return error
    logger.warning("%s; reading the rest of the scan from its Lima files", error)
    live.scan = live.hold(live.scan.as_files())
    return None


def _harvest(sent: _Chunks, live: LiveRun, progress: Any) -> None:
    """The chunks finished since the last look, their time noted."""
    left = []
    for future in sent.futures:
        wrapped = getattr(future, "wrapped_future", None)
        done = wrapped.done() if wrapped is not None else future.state.is_final()
        if not done:
            left.append(future)
            continue
        result = future.result()  # a failed chunk fails the run, as offline
        sent.done.append(result)
        first, stop = live.technique.span(result)
        live.timeline.append((first, stop, time.time()))
        # Growing files do not say how many frames the scan takes: the total grows.
        progress.total = max(progress.total, live.scan.frames)
        progress.advance(stop - first)
    sent.futures = left


def _finish(
    ctx: StepContext,
    plan: Any,
    live: LiveRun,
    chunks: list[Any],
    error: CalypsoError | None,
    progress: Any,
) -> list[Any]:
    """Once the scan has ended: its offline plan and the chunks as that plan has them, or
    the frames it has, marked partial; the chunks to write."""
    technique: LiveTechnique = live.technique
    unit = _unit(ctx, technique)
    frames = sum(b - a for a, b in map(technique.span, chunks))
    reason = _end_reason(live, error)
    if reason is None:
        live.held(technique.after_scan, ctx, live)
        final = plan_in_proposal(
            ctx.run.technique, ctx.raw, plan.parameters, ctx.scans, ctx.output_dir,
            ctx.settings, ctx.run.workers,
        )  # fmt: skip
        recorded = technique.frames_in(final, live.number)
        if recorded != frames:
            reason = f"the scan's file holds {recorded or 0} {unit}, {frames} came"
    if reason is not None:
        if not chunks:
            raise error or RawDataError(f"scan {live.number} ended without a frame: {reason}")
        live.partial = ctx.run.partial = reason
        ctx.report(
            warning=f"scan {live.number} {reason}: the result holds its {frames} {unit} "
            "and is marked partial"
        )
        live.held(technique.as_partial, live, plan, frames)
        ctx.run.planned(plan, _count(ctx, plan))  # the record counts what it holds
        progress.total = frames
        return technique.partial_chunks(ctx, live, plan, chunks)
    # The scan ended well: from here on the plan is the offline run's.
    for name in type(final).model_fields:
        setattr(plan, name, getattr(final, name))
    ctx.run.planned(plan, _count(ctx, plan))  # the run's record follows it (its version folder)
    return technique.final_chunks(ctx, live, plan, chunks)


def _end_reason(live: LiveRun, error: CalypsoError | None) -> str | None:
    """Why the scan's result is partial, or None when it ended well, with end_time."""
    scan = live.scan
    if error is not None:
        return f"did not end ({error})"
    if getattr(scan, "partial", False):
        stream_reason = getattr(scan, "end_reason", None)
        return f"ended early ({stream_reason or 'fewer frames than its npoints'})"
    raw_file = Path(live.dataset_file)

    def ended() -> str | bool:
        try:
            with open_lima(raw_file) as h5:
                entry = h5.get(f"{live.number}.1")
                if entry is None or "end_time" not in entry:
                    return False
                return bliss._optional_text(entry, "end_reason") or "SUCCESS"
        except (OSError, KeyError, ValueError, RuntimeError):  # caught between two writes
            return False

    try:
        file_reason = wait(lambda: live.held(ended), live.end_timeout, "no end_time")
    except RawDataError:
        return f"ended without end_time in {raw_file}"
    return None if file_reason == "SUCCESS" else f"ended early ({file_reason})"


def live_write(ctx: StepContext, plan: Any, **processed: list[Any]) -> list[str]:
    """The offline writer; the partial file goes once the result is there. ``processed``:
    the processing step's results, under the name the technique's writer gives them
    (``chunks``, ``batches``)."""
    from calypso.tasks.live_common import partial_path

    live = _RUNS[ctx.raw]
    outputs = live.technique.write(ctx, live, plan, *processed.values())
    partial_path(plan.output_file).unlink(missing_ok=True)
    return outputs


# -- the flow and its entry point -------------------------------------------------------


def follow_and_reduce(
    technique: str,
    raw: str,
    parameters: BaseModel,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A technique's flow on a scan in progress (``live``: :class:`LiveRun`'s options)."""
    _RUNS[raw] = LiveRun(**(live or {}), technique=live_technique(technique))
    try:
        return run_specification(
            builtin_specification(technique), raw, parameters=parameters, scans=scans,
            output_dir=output_dir, export_to=export_to, trigger=trigger,
            steps=live_steps(technique),
        )  # fmt: skip
    finally:
        scan = _RUNS.pop(raw).scan
        if scan is not None:
            scan.close()


def live_flow(technique: str):
    """The Prefect flow ``<technique>-live`` (built when first used: Prefect loads slowly)."""
    from prefect import flow

    from calypso.executors.flow_runner import flow_task_runner

    return flow(
        name=f"{technique}-live",
        persist_result=False,
        log_prints=True,
        task_runner=flow_task_runner([live_technique(technique).preload]),
    )(follow_and_reduce)


def run_live(
    technique: str,
    input_path: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output: str | None,
    settings: CalypsoSettings,
    *,
    live: dict[str, Any] | None = None,
    export_to: str | None = None,
) -> dict[str, Any]:
    """``calypso run TECHNIQUE --live``: follow the scan writing ``input_path`` and reduce
    it as it comes, on the configured Dask cluster; the summary of the run."""
    from calypso.flows.api import confine_run, current_identity
    from calypso.flows.command_cluster import run_on_cluster
    from calypso.flows.progress_bar import progress_bar

    preload = live_technique(technique).preload  # refuses the techniques not live yet
    began = time.perf_counter()
    confine_run(
        technique, input_path, parameters, output, settings, current_identity(settings), export_to
    )
    if not settings.executor.preload:
        executor = settings.executor.model_copy(update={"preload": [preload]})
        settings = settings.model_copy(update={"executor": executor})
    unit = TECHNIQUES[technique].unit
    bar = progress_bar(unit, f"waiting for the scan writing {Path(input_path).name}")
    flow = live_flow(technique)
    try:
        summary = run_on_cluster(
            settings, 0, unit,
            lambda runner: with_task_runner(flow, runner)(
                technique=technique, raw=input_path, parameters=parameters, scans=scans,
                output_dir=output, export_to=export_to, live=live,
            ),
            bar,
            threaded=TECHNIQUES[technique].threaded_chunks,
        )  # fmt: skip
    finally:
        bar.close()
    summary["wall_s"] = round(time.perf_counter() - began, 3)
    return summary
