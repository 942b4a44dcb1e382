"""Live MX (docs/live.md): what spot finding adds to the following of a scan in progress
(:mod:`calypso.flows.online.live`), for X-ray centring on a grid scan while it runs.

Chunks (a grid row, or fewer images once the first has waited ``latency`` s) find their
spots with the offline chunk's code; the partial file holds the grid's heat map so far
(cells not done NaN) and the best cell so far, rewritten as chunks finish and once more
when the last one is in, so the beamline knows where to centre before the result is
written. Once the scan has ended, the plan is the offline run's (motor positions, end
time) and the MX writer joins the live chunks' per-image values: the offline result,
bit for bit. The detector's pixel mask is copied into the run's work folder for the
tasks, as the offline readers cannot open a dataset file its writer holds in SWMR mode.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from calypso.errors import CalypsoError
from calypso.flows.engine import StepContext
from calypso.flows.online.live_base import LIVE_CHUNK, FirstFrames, LiveRun, LiveTechnique

logger = logging.getLogger(__name__)


class LiveMX(LiveTechnique):
    """Spot finding, heat map and centring of a scan in progress (``flows/builtin/mx.yaml``)."""

    preload = "calypso.tasks.mx"
    doing = "Finding spots on"

    def __init__(self) -> None:
        self.task_scan: Any = None  # the live scan as the chunk tasks read it (pixel mask)

    def warm_up(self, ctx: StepContext, parameters: Any) -> None:
        """While the scan has not begun: each worker runs the spot finder once (its first
        task and imports cost a second or more), this process loads the quick look's
        drawing code (its first use costs as much, after the last image)."""
        from calypso.tasks.live_mx import warm_up_spot_finder

        for _ in range(max(ctx.run.workers, 1)):
            warm_up_spot_finder.submit()
        threading.Thread(target=_warm_plotting, name="calypso-warm-plotting", daemon=True).start()

    def plan(self, ctx: StepContext, parameters: Any, first: FirstFrames) -> Any:
        from calypso.tasks.plans.live import make_live_mx_plan

        return make_live_mx_plan(
            ctx.raw, parameters, first, ctx.output_dir, ctx.settings, LIVE_CHUNK
        )

    def prepare(self, ctx: StepContext, live: LiveRun, plan: Any) -> None:
        import numpy as np

        from calypso.tasks.plans.live import live_pixel_mask

        scan = plan.scans[0]
        if scan.pixel_mask is not None:
            copy = Path(ctx.work_dir) / f"live-pixel-mask-{live.number}.npy"
            np.save(copy, live_pixel_mask(Path(live.dataset_file), live.number, live.detector))
            scan = scan.model_copy(update={"pixel_mask": str(copy)})
        self.task_scan = scan

    def submit(
        self, ctx: StepContext, live: LiveRun, plan: Any, first: int, stop: int, inputs: Any
    ) -> Any:
        from calypso.tasks.live_mx import find_spots_live_chunk

        return find_spots_live_chunk.submit(
            self.task_scan, first, stop, live.scan.locations(first, stop), plan.parameters,
            ctx.work_dir,
        )  # fmt: skip

    def span(self, result: Any) -> tuple[int, int]:
        return result.first_frame, result.first_frame + result.n_frames

    def write_partial(
        self, live: LiveRun, plan: Any, chunks: list[Any], path: Path, state: str
    ) -> None:
        from calypso.tasks.live_mx import write_partial

        write_partial(path, plan.scans[0], chunks, plan.parameters, state)

    def frames_in(self, final: Any, number: int) -> int | None:
        mine = [s for s in final.scans if s.name == f"{number}.1"]
        return mine[0].n_frames if mine else None

    def as_partial(self, live: LiveRun, plan: Any, frames: int) -> None:
        from calypso.tasks.raw.mx_images import bliss_scans

        scan = plan.scans[0]
        try:  # an aborted scan wrote its detector's dataset and motors: read as offline
            recorded = bliss_scans(Path(live.dataset_file), plan.parameters, [live.number])
        except CalypsoError:  # no end (the writer died): the live scan, without motors
            recorded = []
        if recorded and recorded[0].n_frames >= frames:
            scan = recorded[0].model_copy(update={"grid": scan.grid})
            scan = scan.model_copy(
                update={"motors": {n: v[:frames] for n, v in scan.motors.items()}}
            )
        source = scan.sources[0]
        source = source.model_copy(update={"shape": (frames, *source.frame_shape)})
        plan.scans = [scan.model_copy(update={"sources": [source]})]  # its grid kept

    def final_chunks(
        self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]
    ) -> list[Any]:
        from calypso.tasks.mx import find_spots_chunk
        from calypso.tasks.progress import collect

        index = [s.name for s in plan.scans].index(f"{live.number}.1")
        written = [c.model_copy(update={"scan": index}) for c in chunks]
        # Other scans of the dataset it names (an offline run of the dataset takes them all).
        others = [c for c in plan.chunks() if c.scan != index]
        if others:
            futures = [
                find_spots_chunk.submit(c, plan.scans[c.scan], plan.parameters, ctx.work_dir)
                for c in others
            ]
            written += collect(
                futures, plan.n_frames, "Finding spots on the other scans", lambda c: c.n_frames
            )
        return written

    def figures(self, plan: Any, chunks: list[Any]) -> dict[str, Any]:
        return {
            "tasks": len(chunks),
            "busy": sum(c.seconds for c in chunks),
            "chunks": len(chunks),
            "chunk_size": plan.chunk_size,
        }

    def write(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> list[str]:
        from calypso.flows.builtin import mx

        if live.partial is None:
            return mx.write(ctx, plan, chunks)  # the offline step itself
        return self._write_partial_result(ctx, live, plan, chunks)

    def _write_partial_result(
        self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]
    ) -> list[str]:
        """The offline writer on the images that came (a grid they do not fill is left to
        :func:`~calypso.tasks.live_mx.mark_partial_result`), then marked partial."""
        from calypso.tasks.live_mx import mark_partial_result
        from calypso.tasks.mx import run_indexing, write_mx_nexus

        scan = plan.scans[0]
        indexing = run_indexing(plan)  # a grid scan is not indexed, a partial one neither
        bare = plan.model_copy(update={"scans": [scan.model_copy(update={"grid": None})]})
        written = write_mx_nexus(bare, chunks, indexing, ctx.provenance)
        print(indexing.message)
        output, png = Path(plan.output_file), Path(written["png"])
        publication = ctx.run.publication
        if publication is not None:  # still staged: marked before it is published
            output = publication.staged_for(output) or output
            png = publication.staged_for(png) or png
        best = mark_partial_result(output, png, scan, chunks, plan.parameters, live.partial)
        report = written["report"]
        if scan.grid is not None:
            report["scans"][0].update(grid=list(scan.grid), best_position=best)
        ctx.report(png=written["png"], report=report)
        default = "grid" if scan.grid is not None else "per_image"
        return [f"{plan.output_file}::/{scan.name}/{default}"]


def _warm_plotting() -> None:
    """Draw a small quick look into memory (matplotlib, its fonts, the PNG writer)."""
    from io import BytesIO

    import numpy as np

    from calypso.tasks.writers.plots import plot_mx_scan

    try:
        plot_mx_scan(BytesIO(), np.zeros(4), np.zeros((2, 2)), "warm-up", {"row": 0, "column": 0})
    except Exception:  # only a warm-up: the result's quick look says what is wrong
        logger.debug("plotting warm-up failed", exc_info=True)
