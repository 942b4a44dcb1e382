"""User flows: a specification of registered steps (see :mod:`calypso.flows.specification`),
checked, then run by the same engine as the built-in flows.

A parameter given as a list (or ``{start, stop, step}``) is a sweep: one variant a
value, run in parallel, each written to its own folder. Paths a user flow reads or
writes stay inside its dataset's proposal, which must be the flow's own
(:func:`confine_saved_flow`, the one check of :mod:`calypso.registry.access`).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from calypso.executors.flow_runner import flow_task_runner
from calypso.flows.engine import run_specification, with_task_runner
from calypso.flows.specification import FlowSpec, check_specification
from calypso.flows.techniques import TECHNIQUES, all_steps
from calypso.registry.access import Identity, Intent, confine

if TYPE_CHECKING:
    from calypso.registry.saved_flows import SavedFlow
    from calypso.settings import CalypsoSettings

# -- confinement -----------------------------------------------------------------


def spec_parameters(spec: FlowSpec) -> list[tuple[str, str, str]]:
    """``(where, kind, value)`` of every path a specification's steps name (each value of a
    sweep), as the parameter models mark them: what confinement checks."""
    from calypso.flows.api import geometry_files
    from calypso.techniques.fields import path_values

    steps = all_steps()
    found = []
    for name, step in spec.steps.items():
        model = steps[step["task"]].parameter_model()
        values = step.get("parameters") or {}
        for key, kind, value in path_values(model, values) + geometry_files(values):
            found.append((f"steps.{name}.parameters.{key}", kind, value))
    return found


def confine_saved_flow(
    identity: Identity,
    saved: SavedFlow,
    spec: FlowSpec,
    raw: str,
    output: str | None,
    settings: CalypsoSettings,
) -> None:
    """The one confinement check (:func:`calypso.registry.access.confine`) for a run of a
    saved flow: its data, output and path parameters inside its dataset's proposal, which
    must be the flow's own and one that ``identity`` may see."""
    intent = Intent(
        "saved flow run",
        raw=raw,
        output=output,
        parameters=spec_parameters(spec),
        saved_flow=saved.label,
        flow_proposal=saved.proposal,
    )
    confine(identity, intent, settings)


# -- running -------------------------------------------------------------------


def variant_folder(base: str, assignment: dict[str, Any]) -> str:
    parts = [f"{key.split('.', 1)[1]}_{value}" for key, value in assignment.items()]
    return str(Path(base) / "sweep" / "_".join(parts).replace("/", "-"))


def run_user_flow_variants(
    spec: FlowSpec,
    raw: str,
    scans: list[int] | None,
    output_dir: str,
    provenance: dict[str, Any],
    trigger: str | None = None,
) -> list[dict[str, Any]]:
    """Every variant of the sweep (one without a sweep), in parallel: their tasks share
    the Dask cluster, each writes its own folder."""
    variants = spec.variants()
    if len(variants) == 1 and not variants[0]:
        return [_run_variant(spec, {}, raw, scans, output_dir, provenance, trigger)]
    with ThreadPoolExecutor(max_workers=min(8, len(variants))) as pool:
        # Each variant's thread runs in a copy of this flow run's context (Prefect's
        # run context is a context variable), so its tasks go to the same task runner.
        futures = [
            pool.submit(
                contextvars.copy_context().run,
                _run_variant,
                spec,
                assignment,
                raw,
                scans,
                variant_folder(output_dir, assignment),
                provenance,
                trigger,
            )
            for assignment in variants
        ]
        return [future.result() for future in futures]


def _run_variant(
    spec: FlowSpec,
    assignment: dict[str, Any],
    raw: str,
    scans: list[int] | None,
    output_dir: str | None,
    provenance: dict[str, Any],
    trigger: str | None,
) -> dict[str, Any]:
    return run_specification(
        spec,
        raw,
        assignment=assignment,
        scans=scans,
        output_dir=output_dir,
        provenance=provenance,
        trigger=trigger,
    )


def default_output(raw: str, technique: str, name: str, version: int) -> str:
    """Beside the built-in results: ``<processed dataset>/<technique>_<flow>_v<version>``."""
    from calypso.settings import load_settings
    from calypso.tasks.raw.data_policy import RawDataset

    policy = load_settings().processed_data
    folder = RawDataset.from_path(raw).processed_dataset_dir(None, policy)
    return str(folder / f"{technique}_{name}_v{version}")


@flow(name="user-flow", persist_result=False, log_prints=True, task_runner=flow_task_runner())
def user_flow(
    name: str,
    version: int,
    specification: str,
    raw: str,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    trigger: str | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """Run a saved user flow (its specification, as saved) on a raw dataset."""
    spec = check_specification(specification, f"{name}@{version}")
    output = output_dir or default_output(raw, spec.technique, name, version)
    provenance = {
        "user_flow": {
            "name": name,
            "version": version,
            "sha256": sha256,
            "specification": specification,
        }
    }
    variants = run_user_flow_variants(spec, raw, scans, output, provenance, trigger)
    return {"flow": f"{name}@{version}", "technique": spec.technique, "variants": variants}


# Its tasks run in the user flow it calls, on a task runner for the flow's technique.
@flow(name="saved-flow", persist_result=False, log_prints=True)
def saved_flow(
    name: str,
    raw: str,
    version: int | None = None,
    scans: list[int] | None = None,
    output_dir: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """Run a saved user flow (latest version unless ``version``) on a raw dataset inside
    its proposal: the form `calypso serve` offers in the Prefect UI, also started by
    acquisition events for rules ``technique = "flow:NAME"``."""
    from calypso.registry.access import current_identity, served_run, service_identity
    from calypso.registry.saved_flows import SavedFlows
    from calypso.settings import load_settings

    settings = load_settings()
    saved = SavedFlows(settings.catalogue_path).get(name, version)
    spec = check_specification(saved.specification, saved.label)
    # Started by a deployment (serve, an event, the Prefect UI): the service checks it.
    identity = service_identity(settings) if served_run() else current_identity(settings)
    confine_saved_flow(identity, saved, spec, raw, output_dir, settings)
    runner = flow_task_runner([TECHNIQUES[spec.technique].preload])
    return with_task_runner(user_flow, runner)(
        name=saved.name,
        version=saved.version,
        specification=saved.specification,
        raw=raw,
        scans=scans,
        output_dir=output_dir,
        trigger=trigger,
        sha256=saved.sha256,
    )
