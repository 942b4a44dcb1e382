"""What a technique is, said once: its steps, parameters, planner, flow, sample data,
worker preload and deployment options. The CLI, ``calypso serve``, ``deploy/prefect.yaml``,
user flows and the flow version all derive from these descriptors.

The built-in techniques are described in :mod:`calypso.flows.builtin`; more can be
added without touching Calypso: name their descriptors in ``CALYPSO_TECHNIQUES``
(``module:ATTRIBUTE``, comma-separated) or in a package's ``calypso.techniques``
entry points.

Imports are lazy: naming a technique must not import Prefect, pyFAI or scipy,
so ``calypso --help`` and bad-input errors stay fast.
"""

from __future__ import annotations

import ast
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

OUTPUTS = "outputs"  # the type of a step that writes results: the run's end


@dataclass(frozen=True)
class Step:
    """One step a flow may use: typed inputs (outputs of earlier steps), one typed output,
    and the function that runs it, ``run(context, **inputs)`` (``parameters=`` too for a
    planning step)."""

    name: str  # "<technique>.<step>"
    inputs: dict[str, str]  # port -> type
    output: str
    run_at: str  # "module:function"
    description: str
    takes_parameters: bool = False

    @property
    def technique(self) -> str:
        return self.name.split(".", 1)[0]

    def run(self, context: Any, **inputs: Any) -> Any:
        return load(self.run_at)(context, **inputs)

    def parameter_model(self) -> type[BaseModel] | None:
        return TECHNIQUES[self.technique].parameters() if self.takes_parameters else None


@dataclass(frozen=True)
class Option:
    """A command-line option of ``calypso sample-data <technique>`` (argparse's words)."""

    flags: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Technique:
    """Everything Calypso needs to know about one technique."""

    name: str
    description: str  # one line, for the CLI and the deployment
    unit: str  # what its progress counts: frames, spectra ...
    parameters_at: str  # "module:Model": the parameters of its planning step
    plan_at: str  # "module:function(input, parameters, scans, output, settings, workers)"
    count_attribute: str  # the plan's attribute holding the number of units
    steps: tuple[Step, ...]
    specification: Path  # the built-in flow, as a user-flow specification
    flow_at: str  # "module:flow": its Prefect flow (deployments, the UI form)
    preload: str  # the module Dask workers import as they start (its chunk tasks)
    sample_at: str | None = None  # "module:function(directory, **options) -> text to print"
    sample_options: tuple[Option, ...] = ()
    concurrency: int = 2  # flow runs at once under `calypso serve` (settings may override)
    # Its chunk tasks release the GIL while they work and borrow their caches per thread:
    # a command's own local cluster runs them in threads of the command, not in worker
    # processes it would have to start (calypso.executors.dask.local_cluster_options).
    threaded_chunks: bool = False
    rate_name: str | None = None  # an extra summary key for ``per_s`` (``frames_per_s``)
    # "module:function(values, source) -> parameters | None": reads another program's
    # parameter file (pyFAI's integration JSON) given to --params; None: not one of those.
    parameter_file_at: str | None = None
    # "module:function(plan) -> context manager": its first chunks done in a thread of a
    # command waiting for the Prefect server it started (calypso.tasks.head_start).
    head_start_at: str | None = None

    def parameters(self) -> type[BaseModel]:
        return load(self.parameters_at)

    def parameter_file_reader(self) -> Callable[..., dict[str, Any] | None] | None:
        return load(self.parameter_file_at) if self.parameter_file_at else None

    def head_start(self, plan: Any) -> Any:
        """What begins the plan's work while Prefect's server starts (None: nothing)."""
        return load(self.head_start_at)(plan) if self.head_start_at else None

    def plan(self) -> Callable[..., Any]:
        return load(self.plan_at)

    def flow(self) -> Any:
        return load(self.flow_at)

    @property
    def task_module(self) -> str:
        return self.preload

    def roots(self) -> frozenset[str]:
        """The modules a run of this technique starts from: its flow, planner, parameters,
        steps and what its workers preload."""
        roots = {at.split(":")[0] for at in (self.flow_at, self.plan_at, self.parameters_at)}
        roots |= {step.run_at.split(":")[0] for step in self.steps}
        roots.add(self.preload)
        return frozenset(roots)

    def modules(self) -> dict[str, Path]:
        """Every Calypso module a run of this technique can import (flow, steps, planner,
        readers, science, writers; lazy imports too), with its source file."""
        return imported_modules(self.roots())

    @property
    def version(self) -> str:
        """Calypso's version and a digest of :meth:`modules` and of the specification: a
        new version reprocesses what the previous one processed."""
        import calypso

        digest = hashlib.sha256()
        for module, path in sorted(self.modules().items()):
            digest.update(module.encode())
            digest.update(path.read_bytes())
        digest.update(self.specification.read_bytes())
        return f"{calypso.__version__}+{digest.hexdigest()[:12]}"


def load(location: str) -> Any:
    """The object at ``"module:name"``."""
    module, name = location.split(":")
    return getattr(import_module(module), name)


# -- the modules a technique's run imports ----------------------------------------

# Entry points, services and sample data around a run: their code does not change results;
# nor does the list of built-in techniques (each technique's own modules are roots).
_NOT_RESULTS = (
    *(
        "calypso.flows.cli",
        "calypso.flows.api",
        "calypso.flows.online.serve",
        "calypso.flows.online.watch",
    ),
    "calypso.flows.samples",
)
_NOT_RESULTS_EXACT = {"calypso.flows.builtin"}


def module_file(module: str) -> Path | None:
    """The source file of ``module`` (None when there is none), found without importing it:
    the version of a technique is asked for by processes (the watcher) that must not
    import its science code."""
    if module == "calypso" or module.startswith("calypso."):
        import calypso

        base = Path(calypso.__file__).parent.joinpath(*module.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    try:  # a technique described outside Calypso: its own modules
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


# CPython 3.11 builds ASTs with a recursion counter that two threads parsing at once
# corrupt ("SystemError: AST constructor recursion depth mismatch": a served run failed so
# while the service looked up a live technique's modules in another thread).
_PARSING = threading.Lock()


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name the source at ``path`` imports, anywhere in it (lazy imports
    too), relative imports resolved against ``package``; for ``from m import n``, both
    ``m`` and ``m.n`` (``n`` may be a module)."""
    found: set[str] = set()
    source = path.read_bytes()
    with _PARSING:
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _calypso_imports(module: str, path: Path) -> set[str]:
    """Calypso modules ``module`` imports anywhere in its source (lazy imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return {
        name
        for name in imported_names(path, package)
        if name.startswith("calypso")
        and not name.startswith(_NOT_RESULTS)
        and name not in _NOT_RESULTS_EXACT
        and module_file(name)
    }


@cache
def imported_modules(roots: frozenset[str]) -> dict[str, Path]:
    """``roots`` and every Calypso module they import, directly or not, with their files."""
    seen: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        module = pending.pop()
        path = module_file(module)
        if module in seen or path is None:
            continue
        seen[module] = path
        pending.extend(_calypso_imports(module, path) - set(seen))
    return seen


# -- the table of techniques --------------------------------------------------------


class _Techniques(Mapping[str, Technique]):
    """The techniques by name: the built-in ones, then those named by ``CALYPSO_TECHNIQUES``
    and by ``calypso.techniques`` entry points; read on first use."""

    def __init__(self) -> None:
        self._table: dict[str, Technique] | None = None

    def _load(self) -> dict[str, Technique]:
        if self._table is None:
            from importlib.metadata import entry_points

            from calypso.flows.builtin import BUILT_IN

            table = {technique.name: technique for technique in BUILT_IN}
            named = [n.strip() for n in os.environ.get("CALYPSO_TECHNIQUES", "").split(",")]
            extra = [load(location) for location in named if location]
            extra += [point.load() for point in entry_points(group="calypso.techniques")]
            for technique in extra:
                table[technique.name] = technique
            self._table = table
        return self._table

    def __getitem__(self, name: str) -> Technique:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def reload(self) -> None:
        """Read the table again (after ``CALYPSO_TECHNIQUES`` changed, in tests)."""
        self._table = None


TECHNIQUES = _Techniques()


def all_steps() -> dict[str, Step]:
    """Every step of every technique, by name: what a user flow may use."""
    return {step.name: step for technique in TECHNIQUES.values() for step in technique.steps}


def planning_step(technique: str) -> Step:
    """The first step of every technique: check the raw data and parameters, decide the
    work (the technique's planner, run by the engine)."""
    return Step(
        f"{technique}.plan",
        {},
        f"{technique}.plan",
        "calypso.flows.engine:plan",
        f"check the raw data and plan the {technique} work (the technique's parameters)",
        takes_parameters=True,
    )


def preloading_every_technique(settings: Any) -> Any:
    """``settings`` whose local workers import every technique's chunk tasks as they start
    (besides the modules named already): a cluster that serves them all."""
    modules = {*settings.executor.preload, *(t.preload for t in TECHNIQUES.values())}
    executor = settings.executor.model_copy(update={"preload": sorted(modules)})
    return settings.model_copy(update={"executor": executor})
