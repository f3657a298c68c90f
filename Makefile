# bnfuse developer commands. Every target creates .venv on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint fmt bench bench-quick sweep samples clean browser

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[keras,test,bench,html]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## Fuse a shipped sample model and print the report.
demo: $(STAMP)
	$(PY) sample_models/demo.py

## Lint, type-check and run the whole test suite.
test: $(STAMP) lint browser
	$(PY) -m pytest -n 2 --timeout=900 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check bnfuse tests benchmarks sample_models
	$(VENV)/bin/ruff format --check bnfuse tests benchmarks sample_models
	$(VENV)/bin/mypy

## Headless Chromium for the HTML report's browser tests (Debian packages; skipped,
## with the reason, where they cannot be installed).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing and not installable here (needs root and apt-get): the browser tests will be skipped"; fi

fmt: $(STAMP)
	$(VENV)/bin/ruff format bnfuse tests benchmarks sample_models
	$(VENV)/bin/ruff check --fix bnfuse tests benchmarks sample_models

## Head-to-head benchmark (see benchmarks/README.md).
bench: $(STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/keras2.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/keras2.py --quick

## Real architectures and exporter shapes through the whole CLI (~13 min; see benchmarks/README.md).
sweep: $(STAMP)
	$(PY) benchmarks/sweep.py

## Retrain and re-export the sample models (fixed seed).
samples: $(STAMP)
	$(PY) sample_models/make_samples.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
