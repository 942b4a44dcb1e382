"""Live diffraction (docs/live.md): what azimuthal integration adds to the following of a
scan in progress (:mod:`calypso.flows.online.live`).

Workers build their pyFAI integrators while the scan has not begun; a chunk is sent with
its monitor values (from the stream, or the growing dataset file: frames wait for their
monitor points) and integrated by the offline chunk's code into the same part file. Once
the scan has ended, the live chunks' patterns are cut again into the offline plan's
chunks (the writer sums the mean pattern chunk by chunk, so the same chunks give the same
bits), and other scans of the dataset are integrated as offline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from calypso.errors import CalypsoError
from calypso.flows.engine import StepContext
from calypso.flows.online.live_base import (
    LIVE_CHUNK,
    WAIT,
    FirstFrames,
    LiveRun,
    LiveTechnique,
    MissingInputs,
)
from calypso.registry.access.landlock import proposal_confinement, within
from calypso.tasks.raw.live import LiveScan, counter_named


def _monitor(scan: LiveScan, name: str, first: int, stop: int) -> np.ndarray | None:
    """The monitor's points for frames ``first:stop``, None until all are there."""
    return counter_named(scan.read_counters(first, stop), name)


class LiveDiffraction(LiveTechnique):
    """Azimuthal integration of a scan in progress (``flows/builtin/diffraction.yaml``)."""

    preload = "calypso.tasks.diffraction"
    doing = "Integrating"

    def __init__(self) -> None:
        self._missing_since: float | None = None  # when every frame was in, not the monitor

    def warm_up(self, ctx: StepContext, parameters: Any) -> None:
        from calypso.tasks.live_diffraction import warm_up_integrator
        from calypso.tasks.plans.diffraction import _absolute, load_geometry

        names = ("poni", "mask", "dark", "flat")
        absolute = parameters.model_copy(
            update={n: _absolute(getattr(parameters, n)) for n in names}
        )
        # A bad PONI file is named before any frame comes; read inside the proposal.
        held = proposal_confinement(ctx.settings, ctx.raw)
        geometry = within(held, load_geometry, absolute)
        for _ in range(max(ctx.run.workers, 1)):
            warm_up_integrator.submit(absolute, geometry, ctx.raw)

    def plan(self, ctx: StepContext, parameters: Any, first: FirstFrames) -> Any:
        from calypso.tasks.plans.diffraction import ScanPlan
        from calypso.tasks.plans.live import make_live_plan
        from calypso.tasks.raw.lima_saving import run_source

        npoints = first.npoints or first.frames
        source = run_source(first.lima_file, first.dataset, npoints, first.frame_shape, first.dtype)
        scan_plan = ScanPlan(
            number=first.number, title=first.title, detector=first.detector, source=source,
            start_time=first.start_time,
        )  # fmt: skip
        return make_live_plan(
            ctx.raw, parameters, first.raw_file, scan_plan, ctx.output_dir, ctx.settings,
            LIVE_CHUNK,
        )  # fmt: skip

    def chunk_inputs(self, live: LiveRun, plan: Any, first: int, stop: int, ended: bool) -> Any:
        name = plan.parameters.monitor
        if name is None:
            return None
        values = _monitor(live.scan, name, first, stop)
        if values is not None:
            self._missing_since = None
            return values.tolist()
        if not ended:
            return WAIT
        # Every frame is in, not the points: the dataset file may be between two of the
        # writer's sessions (Bliss closes it, then writes the scan's end), which reads as no
        # points. Look again for end_timeout s, then name the counter; the rest is reduced.
        now = time.monotonic()
        self._missing_since = self._missing_since or now
        if now - self._missing_since < live.end_timeout:
            return WAIT
        raise MissingInputs(
            f"scan {live.number} ended without {name} points for frames {first}-{stop - 1} "
            f"(none came within {live.end_timeout:g} s of its last frame)"
        )

    def submit(
        self, ctx: StepContext, live: LiveRun, plan: Any, first: int, stop: int, inputs: Any
    ) -> Any:
        from calypso.tasks.live_diffraction import integrate_live_chunk

        return integrate_live_chunk.submit(
            live.number, first, stop, live.scan.locations(first, stop), inputs,
            plan.parameters, plan.geometry, ctx.work_dir, plan.scans[0].source.frame_shape,
        )  # fmt: skip

    def span(self, result: Any) -> tuple[int, int]:
        return result.start, result.stop

    def write_partial(
        self, live: LiveRun, plan: Any, chunks: list[Any], path: Path, state: str
    ) -> None:
        from calypso.tasks.live_diffraction import write_partial

        write_partial(
            path, live.number, live.detector, plan.n_frames, chunks, plan.parameters, state
        )

    def frames_in(self, final: Any, number: int) -> int | None:
        mine = [s for s in final.scans if s.number == number]
        return mine[0].source.n_frames if mine else None

    def as_partial(self, live: LiveRun, plan: Any, frames: int) -> None:
        scan_plan = plan.scans[0]
        source = _recorded_source(live, frames) or scan_plan.source
        source = source.model_copy(update={"shape": (frames, *scan_plan.source.frame_shape)})
        plan.scans = [scan_plan.model_copy(update={"source": source})]

    def final_chunks(
        self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]
    ) -> list[Any]:
        from calypso.tasks.diffraction import integrate_chunk
        from calypso.tasks.live_diffraction import regroup_parts
        from calypso.tasks.progress import collect

        wanted = [(c.scan.number, c.start, c.stop) for c in plan.chunks()]
        written = regroup_parts(chunks, [w for w in wanted if w[0] == live.number], ctx.work_dir)
        # Other scans of the dataset it names (an offline run of the dataset takes them all).
        others = [c for c in plan.chunks() if c.scan.number != live.number]
        if others:
            futures = [
                integrate_chunk.submit(
                    c, plan.parameters, plan.geometry, plan.raw_file, ctx.work_dir
                )
                for c in others
            ]
            written += collect(
                futures, plan.n_frames, "Integrating the other scans", lambda r: r.stop - r.start
            )
        return written

    def figures(self, plan: Any, chunks: list[Any]) -> dict[str, Any]:
        from calypso.flows.builtin.diffraction import chunk_figures

        return chunk_figures(plan, chunks)

    def write(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> list[str]:
        from calypso.tasks.diffraction import quick_look_path, write_integrated_nexus
        from calypso.tasks.writers.publication import will_exist

        outputs = write_integrated_nexus(plan, chunks, ctx.provenance, partial=live.partial)
        look = quick_look_path(plan)
        ctx.report(png=str(look) if will_exist(look) else None)
        return outputs


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
