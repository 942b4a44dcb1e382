"""Live tomography (docs/live.md): what tomography adds to the following of a scan in
progress (:mod:`calypso.flows.online.live`).

A tomography dataset is several scans (darks, flats, projections, flats again). The live
run follows its projection scan: once the projections on disk cover a half turn (and the
darks and flats before them have ended), one task finds the centre of rotation and
reconstructs the preview slices, and the partial file and the live quick look show
them; a full-turn scan gets its preview half-way, and another with every projection at
its end. Once the projection scan has ended, the run waits for the dataset to end (the
flats after the projections, or no new scan for ``end_timeout`` s), then the centre of
rotation, the reconstruction and the writing are the offline steps on the whole dataset:
the result is the offline one, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calypso.errors import RawDataError
from calypso.flows.engine import StepContext
from calypso.flows.online.live_base import WAIT, FirstFrames, LiveRun, LiveTechnique


class LiveTomography(LiveTechnique):
    """A projection scan followed until its preview, then the dataset reduced as offline
    (``flows/builtin/tomography.yaml``)."""

    preload = "calypso.tasks.live_tomography"
    doing = "Following the projections of"
    unit = "projections"

    def __init__(self) -> None:
        self.live: LiveRun | None = None
        self.first: FirstFrames | None = None
        self.parameters: Any = None
        self.previewed = 0  # projections in the last preview sent
        self.looked_at = 0  # projections whose angles were last looked at
        self.flats: dict[int, bool] = {}  # scan -> whether it is a flat series
        self.ctx: StepContext | None = None  # the plan step's (the run's folders, settings)

    def warm_up(self, ctx: StepContext, parameters: Any) -> None:
        """While the scan has not begun: each worker compiles its reconstruction kernels."""
        from calypso.tasks.live_tomography import warm_up_reconstruction

        for _ in range(max(ctx.run.workers, 1)):
            warm_up_reconstruction.submit(parameters)

    def open_scan(
        self, live: LiveRun, raw_file: Path, scans: list[int] | None, parameters: Any
    ) -> tuple[Any, int, str]:
        """The dataset's projection scan, once it has started: its darks and flats come
        first, for as long as they take (an error once nothing in the dataset has changed
        for ``stall_timeout`` s). A live run the service started at the dataset's first
        scan was given that scan's stream: the projection scan's is looked up by number."""
        from calypso.flows.online.acquisitions import last_change
        from calypso.tasks.live_tomography import projection_scan
        from calypso.tasks.plans.live import open_live_scan, wait

        self.live = live
        what = f"no projection scan started in {raw_file}, and nothing in its dataset changed"
        began = time.time()

        def stalled() -> bool:
            changed = last_change(raw_file.parent) if raw_file.parent.is_dir() else 0.0
            return time.time() - max(began, changed) > live.stall_timeout

        wait(lambda: projection_scan(raw_file, scans) or stalled(), 1e9, what, poll=0.2)
        number = projection_scan(raw_file, scans)
        if number is None:
            raise RawDataError(f"{what} for {live.stall_timeout:.0f} s")
        # A stream server hands out its last scan and the next: a projection scan another
        # has followed already (a run started late) is read from its files, which are whole.
        source = live.source if self._is_last(raw_file, number) else "files"
        return open_live_scan(
            source, raw_file, [number], getattr(parameters, "detector", None),
            stall_timeout=live.stall_timeout,
        )  # fmt: skip

    @staticmethod
    def _is_last(raw_file: Path, number: int) -> bool:
        from calypso.tasks.live_tomography import ended_scan_numbers

        done, running = ended_scan_numbers(raw_file)
        return number == max([*done, *running])

    def plan(self, ctx: StepContext, parameters: Any, first: FirstFrames) -> Any:
        self.ctx, self.first, self.parameters = ctx, first, parameters
        return self._plan(ctx, first.frames, checked=False)

    def _plan(self, ctx: StepContext, frames: int, *, checked: bool) -> Any:
        """The plan of the first ``frames`` projections (``checked``: refused unless they
        can be reconstructed)."""
        import numpy as np

        from calypso.tasks.live_tomography import (
            live_tomography_scan,
            make_live_tomography_plan,
        )

        live, first = self.live, self.first
        assert live is not None and first is not None
        angles = self._angles(live, frames, patient=checked)
        scan = live_tomography_scan(
            first.raw_file, self.parameters, first.number, first.detector,
            live.scan.locations(0, frames), np.zeros(frames) if angles is None else angles,
            first.frame_shape, first.dtype,
        )  # fmt: skip
        return make_live_tomography_plan(
            ctx.raw, scan, self.parameters, ctx.output_dir, ctx.settings, ctx.run.workers,
            checked=checked,
        )  # fmt: skip

    def _angles(self, live: LiveRun, frames: int, *, patient: bool) -> Any:
        """The rotation angles of the first ``frames`` projections (None: not readable now,
        the dataset file caught between two writes); ``patient``: read again for a while."""
        from calypso.tasks.live_tomography import READ_AGAIN_S, rotation_angles
        from calypso.tasks.plans.live import wait

        def read() -> Any:
            counters = live.scan.read_counters(0, frames)
            angles = rotation_angles(counters, self.parameters.rotation_motor)
            return (angles,) if angles is not None and len(angles) >= frames else None

        if not patient:
            found = read()
            return found[0] if found else None
        motor = self.parameters.rotation_motor or "the rotation motor"
        what = f"scan {live.number}: no angle of {motor} for its first {frames} projections"
        return wait(read, READ_AGAIN_S, what)[0]

    def chunk_inputs(self, live: LiveRun, plan: Any, first: int, stop: int, ended: bool) -> Any:
        """Nothing until the projections cover a half turn (or the scan has ended); then
        the plan of the projections so far (None: they never covered one)."""
        from calypso.tasks.live_tomography import REFRESH_DEG
        from calypso.tasks.raw.projections import HALF_TURN_DEG, covered_deg

        # Polled every ~0.1 s: the counters are read only when their answer may change.
        if not ended and (self.previewed or stop == self.looked_at):
            return WAIT
        angles = self._angles(live, stop, patient=ended)
        if angles is not None:  # unreadable now (between two writes): looked at again
            self.looked_at = stop
        covered = covered_deg(angles) if angles is not None else 0.0
        if not ended and covered < HALF_TURN_DEG:
            return WAIT
        # At the scan's end, a second preview only for a quarter turn more (a full turn).
        more = covered - (covered_deg(angles[: self.previewed]) if self.previewed else 0.0)
        if covered < HALF_TURN_DEG or more < REFRESH_DEG:
            return None
        return stop

    def submit(
        self, ctx: StepContext, live: LiveRun, plan: Any, first: int, stop: int, inputs: Any
    ) -> Any:
        from calypso.tasks.live_tomography import preview_live_projections

        preview_plan = None
        if inputs is not None:
            try:
                preview_plan = live.held(self._plan, ctx, stop, checked=True)
            except RawDataError as exc:  # too sparse, say: the offline run will say so too
                ctx.report(warning=f"no live preview of scan {live.number}: {exc}")
            self.previewed = stop
        return preview_live_projections.submit(preview_plan, first, stop, ctx.work_dir)

    def span(self, result: Any) -> tuple[int, int]:
        return result.first, result.stop

    def write_partial(
        self, live: LiveRun, plan: Any, chunks: list[Any], path: Path, state: str
    ) -> None:
        from calypso.tasks.live_tomography import write_partial

        previews = [c for c in chunks if c.preview is not None]
        if previews:
            latest = max(previews, key=lambda c: c.stop)
            write_partial(path, f"{live.number}.1", latest, state)

    def frames_in(self, final: Any, number: int) -> int | None:
        mine = [
            block.n_frames
            for block in final.scan.projections
            if (block.source.dataset or "").lstrip("/").startswith(f"{number}.1/")
        ]
        return sum(mine) if mine else None

    def after_scan(self, ctx: StepContext, live: LiveRun) -> None:
        """Wait for the dataset to end: the flats after the projections have ended, or no
        scan has started for ``end_timeout`` s since the last one ended."""
        from calypso.tasks.live_tomography import ended_scan_numbers

        raw_file = Path(live.dataset_file)
        quiet_since, seen = time.monotonic(), None
        while True:
            done, running = ended_scan_numbers(raw_file)
            after = [n for n in done if n > live.number]
            for number in after:
                if number not in self.flats:
                    self.flats[number] = self._is_flat(raw_file, number)
            if not running and any(self.flats[n] for n in after):
                return
            if (done, running) != seen:
                quiet_since, seen = time.monotonic(), (done, running)
            elif not running and time.monotonic() - quiet_since > live.end_timeout:
                return
            elif running and time.monotonic() - quiet_since > live.stall_timeout:
                raise RawDataError(
                    f"{raw_file}: scan {running[0]} has not ended within "
                    f"{live.stall_timeout:.0f} s of its last change"
                )
            time.sleep(live.poll)

    @staticmethod
    def _is_flat(raw_file: Path, number: int) -> bool:
        from calypso.tasks.plans.live import read_while_written
        from calypso.tasks.raw import bliss
        from calypso.tasks.raw.bliss_projections import scan_role

        def read(h5: Any) -> bool:
            entry = h5[f"{number}.1"]
            return scan_role(entry, bliss._optional_text(entry, "title") or "") == "flat"

        return read_while_written(raw_file, read)

    def as_partial(self, live: LiveRun, plan: Any, frames: int) -> None:
        """The plan of the projections that came (a RawDataError when they cannot be
        reconstructed: too few, or less than a half turn)."""
        assert self.ctx is not None
        try:
            came = self._plan(self.ctx, frames, checked=True)
        except RawDataError as exc:
            raise RawDataError(
                f"scan {live.number} {live.partial}: its {frames} projections cannot be "
                f"reconstructed ({exc})"
            ) from None
        for name in type(came).model_fields:
            setattr(plan, name, getattr(came, name))

    def partial_chunks(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> Any:
        """The centre of rotation of the projections that came, as offline."""
        from calypso.flows.builtin.tomography import center_of_rotation

        return center_of_rotation(ctx, plan)

    def final_chunks(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> Any:
        """The offline step's centre of rotation, on the whole dataset's plan."""
        from calypso.flows.builtin.tomography import center_of_rotation

        return center_of_rotation(ctx, plan)

    def write(self, ctx: StepContext, live: LiveRun, plan: Any, *processed: Any) -> list[str]:
        from calypso.flows.builtin import tomography
        from calypso.tasks.live_tomography import mark_partial_result

        outputs = tomography.write(ctx, plan, *processed)  # the offline step itself
        if live.partial is not None:
            output = Path(plan.output_file)
            publication = ctx.run.publication
            if publication is not None:
                output = publication.staged_for(output) or output
            mark_partial_result(output, live.partial)
        return outputs
