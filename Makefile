# Quick start: `make demo` and `make test` work on a fresh clone with only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# the browser the web UI's tests use (see its rule below); set before any rule names it:
# make expands a rule's prerequisites as it reads the rule
BROWSER := $(VENV)/.chromium
# The strict editable install links each module file: a new module needs a reinstall, so the
# install stamp depends on the list of package files (rewritten only when it changes).
PKGFILES := $(sort $(wildcard stepsource/*.py stepsource/*/*.py aggregates/*.py projections/*.py adapters/*.py adapters/*/*.py engine/*.py engine/*/*.py engine/*/templates/* engine/*/static/*))
FILELIST := $(VENV)/.filelist
$(shell mkdir -p $(VENV) && (echo '$(PKGFILES)' | cmp -s - $(FILELIST) || echo '$(PKGFILES)' > $(FILELIST)))

.PHONY: demo test lint typecheck venv clean

$(STAMP): pyproject.toml $(FILELIST)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	cd $(CURDIR) && $(BIN)/stepsource demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# from outside the repo, where the root folders cannot shadow the installed package
	cd / && $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml

# the bench extra comes first so that tests/test_bench_harness.py runs the quick benchmark
# (bench-quick's code path) inside the suite instead of skipping it
# pytest-xdist runs the suite in TEST_WORKERS processes (each with its own test servers):
# most tests wait on fsyncs, leases and timers rather than on the CPU, so three share two
# cores well. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 3

test: lint $(BENCH_STAMP) $(BROWSER)
	$(BIN)/pytest -n $(TEST_WORKERS)

# The web UI's browser tests drive Chromium through Playwright: its own download where that
# works, else the system's (installed from the distribution's packages when we are root).
$(BROWSER): $(STAMP)
	$(BIN)/python tests/setup_browser.py $(BROWSER)

# Screenshots of every page of the web UI into docs/img/ (shown in docs/ui.md)
.PHONY: screenshots
screenshots: $(STAMP) $(BROWSER)
	STEPSOURCE_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/pytest tests/test_ui_browser.py -k every_page

# Benchmarks (bench/README.md): the bench extra brings the peers (DBOS, Temporal, NATS) and
# the profilers. `make bench` rewrites bench/results.json and bench/REPORT.md; `make
# bench-quick` runs the same code on tiny sizes into a temporary directory.
.PHONY: bench bench-quick
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=strict
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

# The kill loop (tests/test_chaos.py, docs/reliability.md) with 100 SIGKILLs on each backend,
# and the schedule proof (a one-second cron, three workers, one SIGKILLed) at its full 10 s;
# `make test` runs both small. STEPSOURCE_CHAOS_SEED=N repeats a run's random choices and
# STEPSOURCE_CHAOS_REPORT=DIR saves each backend's figures as JSON.
.PHONY: chaos
CHAOS_KILLS ?= 100

chaos: $(STAMP)
	STEPSOURCE_CHAOS_KILLS=$(CHAOS_KILLS) $(BIN)/pytest tests/test_chaos.py -k kill_loop -s -rA
	STEPSOURCE_SCHEDULE_PROOF_SECONDS=10 $(BIN)/pytest tests/test_schedules_process.py -rA

# The documentation site (mkdocs.yml): docs/*.md and an API reference generated from the
# docstrings, built into site/ with every warning an error. `make docs-serve` previews it.
.PHONY: docs docs-serve
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]' --config-settings editable_mode=strict
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build site *.egg-info stepsource.db stepsource.db-wal stepsource.db-shm
