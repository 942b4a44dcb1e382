"""Live reduction (issue #19, docs/live.md): the diffraction flow fed while the scan runs.

The built-in specification (``flows/builtin/diffraction.yaml``: plan, integrate, write)
runs on the one engine with three of its steps fed by a scan in progress
(:class:`~calypso.tasks.raw.live.LiveScan`: blissdata streams or growing Lima files):

- ``plan`` waits for the scan and its first frames, then plans as the offline planner
  does (geometry, output folder, checks) and claims the run (same exactly-once keys);
- ``integrate`` submits chunks as frames become wholly available (a chunk is sent once
  it is full, or once its first frame has waited ``latency`` seconds), rewrites the
  partial file ``<result>.partial.h5`` as chunks finish, and once the scan has ended
  plans again offline: the chunks then are the offline run's, part file for part file;
- ``write`` is the offline writer, so the result is the offline one bit for bit and is
  registered once. A scan that was aborted, or stopped without ``end_time``, gives the
  frames it has, marked partial (``status`` attributes and a warning), never a result
  that looks complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from calypso.errors import CalypsoError, ParameterError, RawDataError
from calypso.flows.builtin.diffraction import chunk_figures
from calypso.flows.engine import StepContext, builtin_specification, run_specification
from calypso.flows.techniques import Step, all_steps
from calypso.settings import CalypsoSettings
from calypso.tasks.plans.live import entry_texts, make_live_plan, open_live_scan, wait
from calypso.tasks.raw import bliss
from calypso.tasks.raw.live import LIMA_DATASET, LiveScan, open_lima

logger = logging.getLogger(__name__)
LIVE_CHUNK = 10  # frames: half a second of a 20 frames/s scan, ~1 s of work on one core


@dataclass
class LiveRun:
    """How one live run follows its scan, and what it saw (the steps of the run share it)."""

    source: str = "files"  # "files", or the blissdata server's redis:// URL
    key: str | None = None  # the blissdata scan key (default: the scan writing the input)
    poll: float = 0.1
    stall_timeout: float = 60.0  # no new frame for this long: the writer stopped
    latency: float = 0.5  # the longest a ready frame waits for its chunk to fill
    end_timeout: float = 10.0  # the stream closed: how long end_time may take to be written
    scan: Any = None  # the LiveScan, once found
    number: int = 0
    detector: str = ""
    dataset_file: str = ""
    partial: str | None = None  # why the result is partial, when it is
    handed: dict[int, float] = field(default_factory=dict)  # frame -> when it was ready
    timeline: list[tuple[int, int, float]] = field(default_factory=list)  # chunk, done at


_RUNS: dict[str, LiveRun] = {}  # the live run of each input followed in this process
LAST_TIMELINE: list[dict[str, Any]] = []  # the last run's (benchmarks read it)


def live_steps(technique: str) -> dict[str, Step]:
    """Every step, with the given technique's plan, integrate and write fed live."""
    if technique != "diffraction":
        raise ParameterError(f"live reduction of {technique}: only diffraction so far")
    steps = dict(all_steps())
    for name in ("plan", "integrate", "write"):
        step = steps[f"diffraction.{name}"]
        steps[step.name] = replace(step, run_at=f"{__name__}:live_{name}")
    return steps


# -- the steps ------------------------------------------------------------------------


def live_plan(ctx: StepContext, parameters: BaseModel) -> Any:
    """Wait for the scan and its first frames; plan it as offline; claim the run."""
    from calypso.tasks.plans.diffraction import ScanPlan
    from calypso.tasks.raw.data_policy import RawDataset
    from calypso.tasks.raw.frames import FrameSource

    live = _RUNS[ctx.raw]
    path = Path(ctx.raw).expanduser().absolute()
    is_file = path.suffix in (".h5", ".hdf5", ".nxs")
    raw_file = path if is_file else RawDataset.from_path(path).raw_file
    live.dataset_file = str(raw_file)
    _warm_up(ctx, parameters)  # while the scan has not begun, or its first frames come
    live.scan, live.number, live.detector = open_live_scan(
        live.source, raw_file, ctx.scans, getattr(parameters, "detector", None),
        key=live.key, stall_timeout=live.stall_timeout,
    )  # fmt: skip
    scan: LiveScan = live.scan
    # The first frames say the frames' shape and type; the stall time-out names a Lima
    # file that never appears.
    wait(lambda: _follow_ranges(live) or scan.frames, live.stall_timeout + 1, "no frame came")
    if not live.detector:
        live.detector = scan.info.detectors[0].split(":")[0]
    first_file, dataset, _, _ = scan.locations(0, 1)[0]
    with open_lima(first_file) as h5:
        frame_shape, dtype = h5[dataset].shape[1:], str(h5[dataset].dtype)
    npoints = scan.info.npoints or scan.frames
    title, start_time = entry_texts(raw_file, live.number)
    source = FrameSource(
        kind="hdf5", files=(first_file,), dataset=dataset or LIMA_DATASET,
        shape=(npoints, *frame_shape), dtype=dtype,
    )  # fmt: skip
    scan_plan = ScanPlan(
        number=live.number, title=title or scan.info.name, detector=live.detector,
        source=source, start_time=start_time,
    )  # fmt: skip
    plan = make_live_plan(
        ctx.raw, parameters, raw_file, scan_plan, ctx.output_dir, ctx.settings, LIVE_CHUNK
    )
    ctx.run.planned(plan, npoints)
    return plan


def _warm_up(ctx: StepContext, parameters: Any) -> None:
    """Workers build their integrators while the scan has not begun (not waited for)."""
    from calypso.tasks.live_diffraction import warm_up_integrator
    from calypso.tasks.plans.diffraction import _absolute, load_geometry

    names = ("poni", "mask", "dark", "flat")
    absolute = parameters.model_copy(update={n: _absolute(getattr(parameters, n)) for n in names})
    geometry = load_geometry(absolute)  # a bad PONI file is named before any frame comes
    for _ in range(max(ctx.run.workers, 1)):
        warm_up_integrator.submit(absolute, geometry)


def _follow_ranges(live: LiveRun) -> int:
    """New frames of the scan, their time noted; how many."""
    count = 0
    for first, stop in live.scan.ready():
        now = time.time()
        for index in range(first, stop):
            live.handed[index] = now
        count += stop - first
    return count


def _monitor(scan: LiveScan, name: str, first: int, stop: int) -> np.ndarray | None:
    """The monitor's points for frames ``first:stop``, None until all are there."""
    for counter, values in scan.read_counters(first, stop).items():
        if counter == name or counter.split(":")[-1] == name:
            return values
    return None


def live_integrate(ctx: StepContext, plan: Any) -> list[Any]:
    """Chunks submitted as the scan's frames come; the offline plan once it has ended."""
    from calypso.tasks.live_diffraction import integrate_live_chunk, partial_path, write_partial
    from calypso.tasks.progress import RunProgress

    live = _RUNS[ctx.raw]
    scan: LiveScan = live.scan
    parameters = plan.parameters
    progress = RunProgress(plan.n_frames, f"Integrating scan {live.number} live")
    partial_file = partial_path(plan.output_file)
    futures: list[Any] = []
    chunks: list[Any] = []
    submitted, waited_since, written_at = 0, None, 0.0
    error: CalypsoError | None = None
    while True:
        try:
            if error is None:
                _follow_ranges(live)
            ready = scan.frames
            ended = scan.finished or error is not None
            while submitted < ready:
                stop = min(submitted + plan.chunk_size, ready)
                waited_since = waited_since or live.handed[submitted]
                young = time.time() - waited_since < live.latency
                if stop - submitted < plan.chunk_size and not ended and young:
                    break  # a short chunk waits a little for more frames
                monitor = None
                if parameters.monitor is not None:
                    values = _monitor(scan, parameters.monitor, submitted, stop)
                    if values is None:
                        if ended:  # the counter never got its points: name it, reduce the rest
                            error = error or RawDataError(
                                f"scan {live.number} ended without {parameters.monitor} points for "
                                f"frames {submitted}-{stop - 1}"
                            )
                            ready = submitted
                        break
                    monitor = values.tolist()
                futures.append(
                    integrate_live_chunk.submit(
                        live.number,
                        submitted,
                        stop,
                        scan.locations(submitted, stop),
                        monitor,
                        parameters,
                        plan.geometry,
                        ctx.work_dir,
                    )
                )
                submitted, waited_since = stop, None
        except RawDataError as exc:
            if error is not None:
                raise
            # The stream server went away: the Lima files from here on; any other error
            # (the writer stopped): what came is reduced, marked partial.
            error = _fall_back(live, exc)
            scan = live.scan
            continue
        futures = _harvest(futures, chunks, live, progress)
        if chunks and time.monotonic() - written_at > 1.0:
            write_partial(
                partial_file, live.number, live.detector, plan.n_frames, chunks, parameters,
                f"running: {sum(c.stop - c.start for c in chunks)} frames done",
            )  # fmt: skip
            written_at = time.monotonic()
        if ended and submitted >= ready:
            break
        time.sleep(live.poll)
    while futures:
        futures = _harvest(futures, chunks, live, progress)
        time.sleep(0.02)
    written = _finish(ctx, plan, live, chunks, error, progress)
    LAST_TIMELINE[:] = [
        {"start": a, "stop": b, "ready": live.handed[a], "ready_last": live.handed[b - 1],
         "done": t}
        for a, b, t in live.timeline
    ]  # fmt: skip
    lags = [t - live.handed[i] for a, b, t in live.timeline for i in range(a, b)]
    ctx.report(
        **chunk_figures(plan, chunks),
        live_lag_p50_s=round(float(np.percentile(lags, 50)), 3) if lags else None,
        live_lag_p95_s=round(float(np.percentile(lags, 95)), 3) if lags else None,
        partial=live.partial,
    )
    return written


def _fall_back(live: LiveRun, error: RawDataError) -> RawDataError | None:
    """The stream server went away mid-scan: the same scan's Lima files from here on (no
    frame lost, none twice), and no error; any other error stays."""
    from calypso.tasks.raw.live_streams import StreamServerGone

    if not isinstance(error, StreamServerGone):
        return error
    logger.warning("%s; reading the rest of the scan from its Lima files", error)
    live.scan = live.scan.as_files()
    return None


def _harvest(futures: list[Any], chunks: list[Any], live: LiveRun, progress: Any) -> list[Any]:
    """The chunks finished since the last look (their time noted); the futures still out."""
    left = []
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        done = wrapped.done() if wrapped is not None else future.state.is_final()
        if not done:
            left.append(future)
            continue
        result = future.result()  # a failed chunk fails the run, as offline
        chunks.append(result)
        live.timeline.append((result.start, result.stop, time.time()))
        # Growing files do not say how many frames the scan takes: the total grows.
        progress.total = max(progress.total, live.scan.frames)
        progress.advance(result.stop - result.start)
    return left


def _finish(
    ctx: StepContext, plan: Any, live: LiveRun, chunks: list[Any], error, progress
) -> list[Any]:
    """Once the scan has ended: its offline plan and the offline chunks (the live ones cut
    again), or the frames it has, marked partial; the chunks to write."""
    from calypso.tasks.diffraction import integrate_chunk
    from calypso.tasks.live_diffraction import regroup_parts
    from calypso.tasks.plans.diffraction import make_integration_plan
    from calypso.tasks.progress import collect

    frames = sum(c.stop - c.start for c in chunks)
    reason = _end_reason(live, error)
    if reason is None:
        final = make_integration_plan(
            ctx.raw, plan.parameters, ctx.scans, ctx.output_dir, ctx.settings, ctx.run.workers
        )
        numbers = [s.number for s in final.scans]
        mine = final.scans[numbers.index(live.number)] if live.number in numbers else None
        if mine is None or mine.source.n_frames != frames:
            reason = (
                f"the scan's file holds {mine.source.n_frames if mine else 0} frames, {frames} came"
            )
    if reason is not None:
        if not chunks:
            raise error or RawDataError(f"scan {live.number} ended without a frame: {reason}")
        live.partial = reason
        ctx.report(
            warning=f"scan {live.number} {reason}: the result holds its {frames} frames "
            "and is marked partial"
        )
        scan_plan = plan.scans[0]
        source = _recorded_source(live, frames) or scan_plan.source
        source = source.model_copy(update={"shape": (frames, *scan_plan.source.frame_shape)})
        plan.scans = [scan_plan.model_copy(update={"source": source})]
        ctx.run.planned(plan, frames)  # the record counts the frames it holds
        progress.total = frames
        return chunks
    # The scan ended well: from here on the plan is the offline run's. Other scans of the
    # dataset it names (an offline run of the dataset takes them all) are integrated now.
    for name in type(plan).model_fields:
        setattr(plan, name, getattr(final, name))
    ctx.run.planned(plan, plan.n_frames)  # the run's record follows it (its version folder)
    wanted = [(c.scan.number, c.start, c.stop) for c in plan.chunks()]
    written = regroup_parts(chunks, [w for w in wanted if w[0] == live.number], ctx.work_dir)
    others = [c for c in plan.chunks() if c.scan.number != live.number]
    if others:
        futures = [
            integrate_chunk.submit(c, plan.parameters, plan.geometry, plan.raw_file, ctx.work_dir)
            for c in others
        ]
        written += collect(
            futures, plan.n_frames, "Integrating the other scans", lambda r: r.stop - r.start
        )
    return written


def _recorded_source(live: LiveRun, frames: int) -> Any:
    """The detector's dataset in the dataset file, when the scan wrote it (an aborted scan
    does): the frames as offline reads them, for the quick look of a partial result."""
    from calypso.tasks.raw.frames import hdf5_frame_source

    try:
        dataset = f"/{live.number}.1/instrument/{live.detector}/data"
        source = hdf5_frame_source(live.dataset_file, dataset)
    except CalypsoError:
        return None
    return source if source.n_frames >= frames else None


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
        except (OSError, KeyError, ValueError):
            return False

    try:
        file_reason = wait(ended, live.end_timeout, "no end_time")
    except RawDataError:
        return f"ended without end_time in {raw_file}"
    return None if file_reason == "SUCCESS" else f"ended early ({file_reason})"


def live_write(ctx: StepContext, plan: Any, chunks: list[Any]) -> list[str]:
    """The offline writer; the partial file goes once the result is there."""
    from calypso.tasks.diffraction import quick_look_path, write_integrated_nexus
    from calypso.tasks.live_diffraction import partial_path
    from calypso.tasks.writers.publication import will_exist

    live = _RUNS[ctx.raw]
    outputs = write_integrated_nexus(plan, chunks, ctx.provenance, partial=live.partial)
    look = quick_look_path(plan)
    ctx.report(png=str(look) if will_exist(look) else None)
    partial_path(plan.output_file).unlink(missing_ok=True)
    return outputs


# -- the flow and its entry point -------------------------------------------------------


def follow_and_reduce(
    raw: str,
    parameters: BaseModel,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    export_to: str | None = None,
    trigger: str | None = None,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The diffraction flow on a scan in progress (``live``: :class:`LiveRun`'s options)."""
    _RUNS[raw] = LiveRun(**(live or {}))
    try:
        return run_specification(
            builtin_specification("diffraction"), raw, parameters=parameters, scans=scans,
            output_dir=output_dir, export_to=export_to, trigger=trigger,
            steps=live_steps("diffraction"),
        )  # fmt: skip
    finally:
        scan = _RUNS.pop(raw).scan
        if scan is not None:
            scan.close()


def live_flow():
    """The Prefect flow ``diffraction-live`` (built when first used: Prefect loads slowly)."""
    from prefect import flow

    from calypso.executors.dask import flow_task_runner

    return flow(
        name="diffraction-live",
        persist_result=False,
        log_prints=True,
        task_runner=flow_task_runner(["calypso.tasks.diffraction"]),
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
    from calypso.flows.api import confine_run, current_identity, progress_bar, run_on_cluster

    live_steps(technique)  # refuses the techniques not live yet
    began = time.perf_counter()
    confine_run(
        technique, input_path, parameters, output, settings, current_identity(settings), export_to
    )
    if not settings.executor.preload:
        executor = settings.executor.model_copy(update={"preload": ["calypso.tasks.diffraction"]})
        settings = settings.model_copy(update={"executor": executor})
    bar = progress_bar("frames", f"waiting for the scan writing {Path(input_path).name}")
    flow = live_flow()
    try:
        summary = run_on_cluster(
            settings, 0, "frames",
            lambda runner: flow.with_options(task_runner=runner)(
                raw=input_path, parameters=parameters, scans=scans, output_dir=output,
                export_to=export_to, live=live,
            ),
            bar,
        )  # fmt: skip
    finally:
        bar.close()
    summary["wall_s"] = round(time.perf_counter() - began, 3)
    return summary
