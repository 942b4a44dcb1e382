"""The rooms keep their shape: data flows one way (raw -> task -> technique -> task ->
NeXus -> registry), so the science imports no orchestration, tasks no flows; modules
stay small enough to read."""

from __future__ import annotations

from pathlib import Path

import pytest

from calypso.flows.techniques import imported_names

REPO = Path(__file__).resolve().parents[1]
CODE = ("techniques", "tasks", "flows", "executors", "registry")
# What each room may not import (lazy imports inside functions count too).
FORBIDDEN = {
    "techniques": (
        *("calypso.tasks", "calypso.flows", "calypso.registry", "calypso.executors"),
        *("prefect", "dask", "distributed", "h5py", "fabio"),  # science: no orchestration, no I/O
    ),
    "tasks": ("calypso.flows",),
}


def modules(room: str) -> list[Path]:
    return sorted((REPO / room).rglob("*.py"))


def imports(path: Path, root: Path = REPO) -> set[str]:
    package = ".".join(["calypso", *path.relative_to(root).with_suffix("").parts[:-1]])
    return imported_names(path, package)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_go_one_way(room):
    wrong = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(room)
        for name in sorted(imports(path))
        if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN[room])
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_500_lines():
    long = [
        f"{path.relative_to(REPO)}: {lines} lines"
        for room in CODE
        for path in modules(room)
        if (lines := len(path.read_text().splitlines())) > 500
    ]
    assert not long, "\n".join(long)


def test_the_checks_see_a_wrong_import(tmp_path):
    """The import check reads lazy and relative imports too."""
    module = tmp_path / "techniques" / "probe.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from ..tasks import bliss\n    import prefect\n")
    assert imports(module, root=tmp_path) >= {"calypso.tasks", "prefect"}


def test_every_package_is_in_the_distribution():
    """pyproject.toml lists the packages (the repository root is the package): a new
    subpackage missing there would be absent from a non-editable install."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(["calypso", *init.parent.relative_to(REPO).parts])
        for room in CODE
        for init in (REPO / room).rglob("__init__.py")
    }
    assert found <= set(config["packages"]), sorted(found - set(config["packages"]))
    assert "*.yaml" in config["package-data"]["calypso.flows.builtin"]


def test_the_flow_version_covers_what_a_run_imports():
    """A fix in a reader, a writer or the science reprocesses; the CLI does not."""
    from calypso.flows.techniques import TECHNIQUES

    for technique in TECHNIQUES.values():
        modules = set(technique.modules())
        name = technique.name
        assert {f"calypso.techniques.{name}", f"calypso.tasks.{name}"} <= modules, name
        assert {f"calypso.tasks.plans.{name}", "calypso.tasks.writers.nexus"} <= modules, name
        assert "calypso.tasks.raw.bliss" in modules, name
        assert not any(
            m.startswith(("calypso.flows.cli", "calypso.flows.samples")) for m in modules
        )
        others = {f"calypso.flows.builtin.{t}" for t in TECHNIQUES if t != name}
        assert not modules & others, name  # another technique's change does not reprocess
