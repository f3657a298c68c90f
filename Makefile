# bnfuse developer commands. Every target creates .venv on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint fmt bench bench-quick samples clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[keras,test,bench]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## Fuse a shipped sample model and print the report.
demo: $(STAMP)
	$(PY) sample_models/demo.py

## Lint, type-check and run the whole test suite.
test: $(STAMP) lint
	$(PY) -m pytest -n 2 --timeout=900 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check bnfuse tests benchmarks sample_models
	$(VENV)/bin/ruff format --check bnfuse tests benchmarks sample_models
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format bnfuse tests benchmarks sample_models
	$(VENV)/bin/ruff check --fix bnfuse tests benchmarks sample_models

## Head-to-head benchmark (see benchmarks/README.md).
bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

## Retrain and re-export the sample models (fixed seed).
samples: $(STAMP)
	$(PY) sample_models/make_samples.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
