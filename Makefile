# Calypso: the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test docs bench lint format clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		(echo "Calypso needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The portal's HDF5 viewer (h5web) is built with npm into flows/portal/static/viewer
# (gitignored); without node >= 18 and npm it is skipped, and `calypso portal` says how
# to build it (everything else works without it).
PORTAL_FRONTEND := flows/portal/frontend
VIEWER := flows/portal/static/viewer/viewer.js

# Calypso's own modules byte-compiled, as pip does for what it installs (an editable
# install is not): every process that imports them skips ~0.15 s of compiling where
# nothing writes Python's cache (PYTHONDONTWRITEBYTECODE, a read-only checkout). Only
# modules changed since are compiled again.
install: $(STAMP)
	@$(BIN)/python -m compileall -q -x '/(node_modules|static|_build)/' $(wildcard *.py) executors flows registry tasks techniques >/dev/null
	@# A new home's Prefect database is copied from one migrated here once per Prefect
	@# version (flows/prefect_database.py): Prefect's 116 migrations cost a first command 3-6 s.
	@# Without it everything works, only slower (tests/test_prefect_database.py makes it).
	@$(BIN)/python -m calypso.flows.prefect_database --if-missing \
		|| echo "Prefect database template: not made (see above); a new home's first command migrates its database"
	@if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then \
		echo "portal viewer: skipped (node >= 18 and npm not found): the portal works without it"; \
	elif ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 18 ? 1 : 0)'; then \
		echo "portal viewer: skipped (node $$(node --version) is older than 18)"; \
	elif [ ! -f $(VIEWER) ] || [ -n "$$(find $(PORTAL_FRONTEND)/src $(PORTAL_FRONTEND)/package.json \
			$(PORTAL_FRONTEND)/vite.config.js -newer $(VIEWER) 2>/dev/null)" ]; then \
		echo "portal viewer: npm install and build ($(PORTAL_FRONTEND))"; \
		(cd $(PORTAL_FRONTEND) && npm install --no-audit --no-fund --loglevel=error && npm run build --silent) \
			|| { echo "portal viewer: the npm build failed (see above): the portal works without it"; }; \
	fi

demo: install
	$(BIN)/calypso demo

DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(DOCS_STAMP)

# The documentation site in docs/_build/html; its tutorials are notebooks executed on
# the real data (CALYPSO_TEST_DATA, default ../shared/data); any warning is an error.
docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "documentation: docs/_build/html/index.html"

# Two test processes (pytest-xdist): most tests wait on servers and subprocesses, so two
# share two cores well (~13 min instead of ~18 here); --dist loadfile keeps each module,
# and its module-scoped servers, in one process; each process starts its own Prefect server.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --durations=15

bench: install
	$(BIN)/python tests/benchmarks/bench_diffraction.py --frames 500 --half
	$(BIN)/python tests/benchmarks/bench_spectroscopy.py --spectra 10000 --half
	$(BIN)/python tests/benchmarks/bench_tomography.py --rows 64 --columns 1024 --projections 900
	$(BIN)/python tests/benchmarks/bench_mx.py --frames 200
	$(BIN)/python tests/benchmarks/bench_export.py --gigabytes 2

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo-data build *.egg-info
