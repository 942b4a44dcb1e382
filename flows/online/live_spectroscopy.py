"""Live XAS maps (docs/live.md): what spectroscopy adds to the following of a scan in
progress (:mod:`calypso.flows.online.live`), for a map scan whose points are spectra.

The scan is followed through its growing dataset file
(:class:`~calypso.tasks.raw.live_rows.CounterRows`: a spectrum is there once every
2D counter holds its row) or through Bliss's data streams
(:class:`~calypso.tasks.raw.live_rows.StreamRows`: once every 2D counter's stream
has it; the rows are read from the streams, which the file may lag). Chunks of spectra
are normalised (and their EXAFS extracted) with the offline batch's code as they come;
the partial file holds the spectra and the map so far, those not done NaN. Once the scan
has ended, the plan is the offline run's, and so are the batches: a live chunk that is
one of them (the same spectra, the same calibration: ``--set batch_size=N`` makes the
live chunks the result's batches) is kept, the others are reduced again (about half a
millisecond a spectrum), because the EXAFS extraction of a batch depends on its spectra
(its k grid): the result is the offline one, bit for bit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calypso.errors import RawDataError
from calypso.flows.engine import StepContext
from calypso.flows.online.live_base import WAIT, FirstFrames, LiveRun, LiveTechnique, PlanWaits

LOOK_SPECTRA = 2000  # of a map scanned an energy at a time, averaged in its look meanwhile


class LiveSpectroscopy(LiveTechnique):
    """A map scan's spectra reduced as they come (``flows/builtin/spectroscopy.yaml``)."""

    preload = "calypso.tasks.live_spectroscopy"
    doing = "Reducing the spectra of"

    def __init__(self) -> None:
        self.reference_e0: float | None = None  # the live chunks' calibration
        self.reused = 0  # live chunks that are batches of the result
        self.live: LiveRun | None = None  # the run (the plan reads its scan's first spectra)
        self._scanned: tuple[Path | None, float, int] | None = None  # file, when, points

    def warm_up(self, ctx: StepContext, parameters: Any) -> None:
        """While the scan has not begun: each worker reduces a model spectrum once (its
        first task and the reduction's imports cost seconds)."""
        from calypso.tasks.live_spectroscopy import warm_up_spectra_reduction

        for _ in range(max(ctx.run.workers, 1)):
            warm_up_spectra_reduction.submit(parameters)

    def open_scan(
        self, live: LiveRun, raw_file: Path, scans: list[int] | None, parameters: Any
    ) -> tuple[Any, int, str]:
        """The map being written: the rows of its 2D counters, from its dataset file as it
        grows, or from Bliss's data streams (a redis:// source)."""
        from calypso.tasks.plans.live import find_stream_scan, running_entry, wait
        from calypso.tasks.raw.live_rows import CounterRows, StreamRows

        # The energy axis the layout is told by: as the offline reader takes it.
        axis = parameters.mono_angle if parameters.energy is None else parameters.energy
        self.live = live
        if live.source == "files":
            what = f"no scan started writing {raw_file}"
            number = wait(lambda: running_entry(raw_file, scans), live.stall_timeout, what)
            return CounterRows(raw_file, number, live.stall_timeout, energy=axis), number, ""
        key = find_stream_scan(live.source, raw_file, scans, live.stall_timeout)
        scan = StreamRows(live.source, key, raw_file, live.stall_timeout, energy=axis)
        return scan, scan.info.number, ""

    def plan(self, ctx: StepContext, parameters: Any, first: FirstFrames) -> Any:
        from calypso.tasks.live_spectroscopy import make_live_spectroscopy_plan
        from calypso.tasks.plans.spectroscopy import MAP_SPECTRA_TRIED

        # The first spectrum that can be reduced of those there: a map's first pixels may
        # be off the sample, when the plan waits for more (up to MAP_SPECTRA_TRIED). The
        # run's scan: its files, once the stream server has gone.
        assert self.live is not None
        scan = self.live.scan
        there = max(min(scan.frames, MAP_SPECTRA_TRIED), 1)
        try:
            plan = make_live_spectroscopy_plan(
                ctx.raw, parameters, first, scan.table(0, there), ctx.output_dir,
                ctx.settings, whole_at_end=scan.whole_at_end, workers=ctx.run.workers,
            )  # fmt: skip
        except RawDataError as exc:
            if there < MAP_SPECTRA_TRIED and not scan.finished:
                raise PlanWaits from exc
            raise
        self.reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
        return plan

    def meanwhile(self, ctx: StepContext, live: LiveRun, parameters: Any) -> None:
        """A map scanned an energy at a time has no whole spectrum before its end: at most
        every second, as energy points come, the partial file holds the mean absorption
        of its spectra over the energies scanned so far (of at most ``LOOK_SPECTRA`` of
        them, spread over the map), drawn as the live quick look. Best effort: a look
        that cannot be made now is tried again at the next energy points."""
        import logging

        from calypso.tasks.live_spectroscopy import write_energy_points_partial
        from calypso.tasks.writers.live_look import LiveLook

        path, at, shown = self._scanned or (None, 0.0, 0)
        points = live.scan.energy_points  # held inside the proposal, as the files it reads
        if points < 2 or points == shown or time.monotonic() - at < 1.0:
            return
        path = path or self._partial_path(ctx, live)
        self._scanned = (path, at, shown)
        state = f"running: {points} energy points scanned (spectra reduced at the map's end)"
        try:
            table = live.scan.energy_points_table(LOOK_SPECTRA)
            points = live.held(
                write_energy_points_partial, path, f"{live.number}.1", table, parameters, state
            )
        except Exception:  # a counter a point behind the others, a file being extended
            logging.getLogger(__name__).debug("energy points not shown", exc_info=True)
            return
        self._scanned = (path, time.monotonic(), points)
        if live.look is None:
            counters = live.scan.info.detectors
            name = f"scan {live.number} {counters[0] if counters else ''}"
            live.look = LiveLook(name, live.confinement)
        live.look.show(path, state)

    def _partial_path(self, ctx: StepContext, live: LiveRun) -> Path:
        """The partial file of the result to come, its folder made as the run will make
        it (before the plan, which needs a whole spectrum)."""
        from types import SimpleNamespace

        from calypso.tasks.live_common import partial_path
        from calypso.tasks.plans.live import _live_output
        from calypso.tasks.plans.spectroscopy import TECHNIQUE
        from calypso.tasks.writers.permissions import output_permissions

        raw_file = Path(live.dataset_file)
        raw, out = _live_output(
            ctx.raw, raw_file, live.number, TECHNIQUE, ctx.output_dir, ctx.settings, 0
        )
        output_permissions(SimpleNamespace(raw=raw, input=ctx.raw), ctx.settings).make_folders(out)
        return partial_path(out / f"{raw_file.stem}.h5")

    def chunk_inputs(self, live: LiveRun, plan: Any, first: int, stop: int, ended: bool) -> Any:
        # With batch_size set, the live chunks are to be the result's batches: a short one
        # waits for its spectra (or the scan's end) rather than going early.
        if plan.parameters.batch_size and stop - first < plan.chunk_size and not ended:
            return WAIT
        return None

    def submit(
        self, ctx: StepContext, live: LiveRun, plan: Any, first: int, stop: int, inputs: Any
    ) -> Any:
        from calypso.tasks.live_spectroscopy import reduce_live_spectra
        from calypso.tasks.plans.spectroscopy import SpectraBatch

        batch = SpectraBatch(source=plan.sources[0], start=first, stop=stop)
        table = live.scan.table(first, stop)  # from the streams: the file may lag them
        return reduce_live_spectra.submit(
            batch, table, plan.parameters, self.reference_e0, ctx.work_dir
        )

    def span(self, result: Any) -> tuple[int, int]:
        return result.start, result.stop

    def write_partial(
        self, live: LiveRun, plan: Any, chunks: list[Any], path: Path, state: str
    ) -> None:
        from calypso.tasks.live_spectroscopy import write_partial

        write_partial(path, f"{live.number}.1", chunks, live.scan.frames, state)

    def frames_in(self, final: Any, number: int) -> int | None:
        mine = [s for s in final.sources if s.scan == number]
        return mine[0].n_spectra if mine else None

    def as_partial(self, live: LiveRun, plan: Any, frames: int) -> None:
        plan.sources = [plan.sources[0].model_copy(update={"n_spectra": frames})]

    def final_chunks(
        self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]
    ) -> list[Any]:
        """The offline plan's batches: the live chunks that are batches of it (same spectra,
        same calibration and parameters), the others reduced as offline."""
        from calypso.tasks.progress import collect
        from calypso.tasks.spectroscopy import merge_repeated_scans, reduce_spectra_batch

        reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
        same = reference_e0 == self.reference_e0
        live_label = f"{live.number}.1"
        kept = {(c.start, c.stop): c for c in chunks} if same else {}
        batches, again = [], []
        for batch in plan.batches():
            mine = batch.source.scan == live.number and batch.source.label == live_label
            found = kept.get((batch.start, batch.stop)) if mine else None
            if found is not None:
                batches.append(found)
            else:
                again.append(batch)
        self.reused = len(batches)
        arguments = (plan.parameters, reference_e0, ctx.work_dir)
        if plan.in_process:  # as offline: no Dask round trip for milliseconds of work
            batches += [reduce_spectra_batch(batch, *arguments) for batch in again]
        elif again:
            futures = [reduce_spectra_batch.submit(batch, *arguments) for batch in again]
            batches += collect(
                futures, sum(b.stop - b.start for b in again), "Reducing spectra again",
                lambda r: r.stop - r.start,
            )  # fmt: skip
        if plan.merges:
            batches.append(merge_repeated_scans(plan, batches, ctx.work_dir))
        return batches

    def figures(self, plan: Any, chunks: list[Any]) -> dict[str, Any]:
        return {
            "tasks": len(chunks),
            "busy": sum(c.seconds for c in chunks),
            "live_chunks_kept": self.reused,
            "merged": plan.merges,
            "calibration": plan.calibration.model_dump() if plan.calibration else None,
            "warning": "; ".join(plan.notes) or None,  # what the plan chose, as offline
        }

    def write(self, ctx: StepContext, live: LiveRun, plan: Any, chunks: list[Any]) -> list[str]:
        from calypso.flows.builtin import spectroscopy
        from calypso.tasks.live_spectroscopy import mark_partial_result

        outputs = spectroscopy.write(ctx, plan, chunks)  # the offline step itself
        if live.partial is not None:  # still staged: marked before it is published
            output = Path(plan.output_file)
            publication = ctx.run.publication
            if publication is not None:
                output = publication.staged_for(output) or output
            mark_partial_result(output, f"{live.number}.1", live.partial)
        return outputs
