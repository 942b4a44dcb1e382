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

install: $(STAMP)

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

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests --durations=15

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
