"""The technique flows the CLI (and later deployments) can run, found by name.

Imports are lazy: naming a technique must not import Prefect, pyFAI or scipy,
so ``calypso --help`` and bad-input errors stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Technique:
    """Where a technique's parameter model, planning and flow live."""

    name: str
    unit: str  # what its progress counts: frames, spectra ...
    parameters_at: str  # "module:ClassName"
    plan_at: str  # "module:function(input, parameters, scans, output, settings, workers)"
    count_attribute: str  # the plan's attribute holding the number of units
    flow_at: str  # "module:flow"

    @property
    def task_module(self) -> str:
        return f"calypso.tasks.{self.name}"

    def parameters(self) -> type[BaseModel]:
        return _load(self.parameters_at)

    def plan(self) -> Callable[..., Any]:
        return _load(self.plan_at)

    def flow(self) -> Any:
        return _load(self.flow_at)

    @property
    def version(self) -> str:
        """Calypso's version and a digest of this technique's code (flow, tasks, plan,
        science): a new version reprocesses what the previous one processed."""
        import hashlib
        from importlib.util import find_spec

        import calypso

        digest = hashlib.sha256()
        modules = [
            self.flow_at.split(":")[0],
            self.task_module,
            self.plan_at.split(":")[0],
            self.parameters_at.split(":")[0],
        ]
        for module in sorted(set(modules)):
            spec = find_spec(module)
            if spec is not None and spec.origin:
                with open(spec.origin, "rb") as source:
                    digest.update(source.read())
        return f"{calypso.__version__}+{digest.hexdigest()[:12]}"


def _load(location: str) -> Any:
    module, name = location.split(":")
    return getattr(import_module(module), name)


TECHNIQUES: dict[str, Technique] = {
    technique.name: technique
    for technique in (
        Technique(
            name="diffraction",
            unit="frames",
            parameters_at="calypso.techniques.diffraction:DiffractionParameters",
            plan_at="calypso.tasks.diffraction_plan:make_integration_plan",
            count_attribute="n_frames",
            flow_at="calypso.flows.diffraction:diffraction",
        ),
        Technique(
            name="spectroscopy",
            unit="spectra",
            parameters_at="calypso.techniques.spectroscopy:SpectroscopyParameters",
            plan_at="calypso.tasks.spectroscopy_plan:make_spectroscopy_plan",
            count_attribute="n_spectra",
            flow_at="calypso.flows.spectroscopy:spectroscopy",
        ),
        Technique(
            name="tomography",
            unit="slices",
            parameters_at="calypso.techniques.tomography:TomographyParameters",
            plan_at="calypso.tasks.tomography_plan:make_tomography_plan",
            count_attribute="n_slices",
            flow_at="calypso.flows.tomography:tomography",
        ),
        Technique(
            name="mx",
            unit="images",
            parameters_at="calypso.techniques.mx:MXParameters",
            plan_at="calypso.tasks.mx_plan:make_mx_plan",
            count_attribute="n_frames",
            flow_at="calypso.flows.mx:mx",
        ),
    )
}
