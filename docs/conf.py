"""Sphinx configuration of Calypso's documentation site (``make docs``)."""

from __future__ import annotations

import os
from pathlib import Path

import calypso

DOCS = Path(__file__).parent
REPO = DOCS.parent
BUILD = DOCS / "_build"

project = "Calypso"
author = "Calypso developers"
copyright = "2026, Calypso developers"

release = version = calypso.__version__

extensions = [
    "myst_nb",  # Markdown pages and notebooks (MyST), notebooks executed at build time
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpydoc docstrings
    "sphinxarg.ext",  # the CLI reference, from the parser itself
    "sphinxcontrib.autodoc_pydantic",  # the parameter and settings references, from the models
]

# The tutorials run Calypso on the real data (CALYPSO_TEST_DATA, as the tests do), with their
# own catalogue and Prefect home under _build: building the docs never touches a user's.
os.environ.setdefault("CALYPSO_TEST_DATA", str(REPO.parent / "shared" / "data"))
os.environ["CALYPSO_HOME"] = str(BUILD / "calypso-home")
os.environ["PREFECT_HOME"] = str(BUILD / "prefect-home")
# The tutorials' commands share the local Prefect server and Dask cluster the first one
# starts; both stop a minute after the build, not 30 and 10 minutes after it.
os.environ["CALYPSO_SERVER__LOCAL_KEEP_S"] = "60"
os.environ["CALYPSO_EXECUTOR__LOCAL_KEEP_S"] = "60"
os.environ.pop("CALYPSO_CONFIG", None)
os.environ.pop("CALYPSO_CATALOGUE__PATH", None)

nb_execution_mode = "force"  # always run: a tutorial that no longer works fails the build
if not (Path(os.environ["CALYPSO_TEST_DATA"]) / "SOURCES.md").is_file():
    # The tutorials run on the real test data; without it the pages are built unrun.
    print(f"docs: no test data at {os.environ['CALYPSO_TEST_DATA']}: tutorials not executed")
    nb_execution_mode = "off"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

exclude_patterns = ["_build", "jupyter_execute", "tutorials/out", "**/.ipynb_checkpoints"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_pydantic_model_show_json = False
autodoc_pydantic_model_show_config_summary = False
autodoc_pydantic_model_show_validator_summary = False
autodoc_pydantic_model_show_validator_members = False
autodoc_pydantic_model_show_field_summary = False
autodoc_pydantic_field_list_validators = False
autodoc_pydantic_settings_show_json = False
autodoc_pydantic_settings_show_config_summary = False
autodoc_pydantic_settings_show_validator_summary = False
autodoc_pydantic_settings_show_field_summary = False

html_theme = "pydata_sphinx_theme"
html_title = f"Calypso {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}


def _write_parameter_reference() -> None:
    """One section per technique, from the technique table itself: a technique added by a
    descriptor (or an entry point) appears here with nothing else to edit."""
    from calypso.flows.techniques import TECHNIQUES

    lines = []
    for name, technique in TECHNIQUES.items():
        model = technique.parameters()
        title = f"{name}"
        lines += [title, "-" * len(title), "", f"``calypso parameters {name}``", ""]
        lines += [f".. autopydantic_model:: {model.__module__}.{model.__qualname__}", ""]
        lines += ["   :inherited-members: BaseModel", ""]
    generated = DOCS / "reference" / "_generated"
    generated.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    target = generated / "parameters.rst"
    if not target.exists() or target.read_text() != text:  # unchanged: no rebuild
        target.write_text(text)


_write_parameter_reference()
