"""Spectroscopy: XAS from counters to normalised spectra, chi(k) and |chi(R)|."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calypso.flows.techniques import OUTPUTS, Option, Step, Technique, planning_step


def reduce(ctx: Any, plan: Any) -> Any:
    """Batches of spectra reduced on the task runner (vectorised inside a batch), then the
    repeated scans merged. Without repeats to merge, the batches go to the writer as they
    finish, which assembles each while the others are reduced."""
    from calypso.tasks.progress import AsTheyFinish, RunProgress, collect
    from calypso.tasks.spectroscopy import merge_repeated_scans, reduce_spectra_batch

    reference_e0 = plan.calibration.reference_e0 if plan.calibration else None
    arguments = (plan.parameters, reference_e0, ctx.work_dir)
    described = f"Reducing {plan.n_spectra} spectra"
    ctx.report(
        merged=plan.merges,
        calibration=plan.calibration.model_dump() if plan.calibration else None,
        warning="; ".join(plan.notes) or None,
    )

    def finished(batches: list[Any]) -> None:
        ctx.report(tasks=len(batches), busy=sum(b.seconds for b in batches))

    if plan.in_process:  # no Dask round trip for milliseconds of work
        parts = plan.batches()
        progress = RunProgress(plan.n_spectra, described, artifact=len(parts) > 1)
        batches = []
        for batch in parts:
            batches.append(reduce_spectra_batch(batch, *arguments))
            progress.advance(batch.stop - batch.start)
    else:
        futures = [reduce_spectra_batch.submit(batch, *arguments) for batch in plan.batches()]
        if not plan.merges:  # the writer takes them as they finish
            return AsTheyFinish(
                futures, plan.n_spectra, described, lambda r: r.stop - r.start, finished
            )
        batches = collect(futures, plan.n_spectra, described, lambda r: r.stop - r.start)
    if plan.merges:
        batches.append(merge_repeated_scans(plan, batches, ctx.work_dir))
    finished(batches)
    return batches


def write(ctx: Any, plan: Any, batches: list[Any]) -> list[str]:
    from calypso.tasks.spectroscopy import write_spectroscopy_nexus

    written = write_spectroscopy_nexus(plan, batches, ctx.provenance)
    figures = written["key_figures"]  # by scan; a scan's "warning" says what is doubtful
    doubts = [f"{scan}: {f['warning']}" for scan, f in figures.items() if f.get("warning")]
    ctx.report(png=written["png"], key_figures=figures, warning="; ".join(doubts) or None)
    return written["outputs"]


def write_sample(
    directory: Path,
    seed: int = 0,
    repeats: int = 3,
    spectra: int = 0,
    energy_rows: bool = False,
    off_sample: int = 0,
) -> str:
    """Repeated XAS scans of an Fe foil (or a map of ``spectra`` spectra, scanned an energy
    at a time with ``energy_rows``, its first ``off_sample`` positions off the sample); what
    to run next."""
    from calypso.errors import ParameterError
    from calypso.flows.samples.spectroscopy import (
        reference_spectrum,
        write_spectroscopy_map_sample,
        write_spectroscopy_sample,
    )

    if spectra < 0 or repeats < 1 or not 0 <= off_sample <= spectra:
        raise ParameterError("--spectra must be >= 0, --repeats >= 1, --off-sample 0 to --spectra")
    if spectra:
        dataset = write_spectroscopy_map_sample(
            directory, spectra, seed=seed, energy_rows=energy_rows, off_sample=off_sample
        )
    else:
        dataset = write_spectroscopy_sample(directory, repeats, seed=seed)
    return (
        f"raw dataset: {dataset.raw_dataset_dir} (from {reference_spectrum().source})\n"
        f"reduce it with:\n  calypso run spectroscopy {dataset.raw_dataset_dir}"
    )


SPECTROSCOPY = Technique(
    name="spectroscopy",
    description="Reduce X-ray absorption spectra: mu(E), calibration, merge, normalisation, "
    "EXAFS; batches of spectra in parallel on Dask; NeXus, XDI and a quick look.",
    unit="spectra",
    parameters_at="calypso.techniques.spectroscopy:SpectroscopyParameters",
    plan_at="calypso.tasks.plans.spectroscopy:make_spectroscopy_plan",
    count_attribute="n_spectra",
    steps=(
        planning_step("spectroscopy"),
        Step(
            "spectroscopy.reduce",
            {"plan": "spectroscopy.plan"},
            "spectroscopy.batches",
            f"{__name__}:reduce",
            "mu(E), calibration, normalisation, EXAFS in batches; merge of repeats",
        ),
        Step(
            "spectroscopy.write",
            {"plan": "spectroscopy.plan", "batches": "spectroscopy.batches"},
            OUTPUTS,
            f"{__name__}:write",
            "NeXus, XDI and the quick-look plot",
        ),
    ),
    specification=Path(__file__).with_name("spectroscopy.yaml"),
    flow_at="calypso.flows.spectroscopy:spectroscopy",
    preload="calypso.tasks.spectroscopy",
    sample_at=f"{__name__}:write_sample",
    sample_options=(
        Option(("--repeats",), {"type": int, "default": 3, "help": "repeated scans of a foil"}),
        Option(
            ("--spectra",),
            {"type": int, "default": 0, "help": "a mapping scan of N spectra instead of repeats"},
        ),
        Option(
            ("--energy-rows",),
            {
                "action": "store_true",
                "help": "the map scanned an energy at a time (2D counters: energy x spectrum)",
            },
        ),
        Option(
            ("--off-sample",),
            {
                "type": int,
                "default": 0,
                "help": "the map's first N positions off the sample (no edge: left out)",
            },
        ),
    ),
)
