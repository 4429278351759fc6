# Quick start: `make demo` and `make test` work on a fresh clone with only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# The strict editable install links each module file: a new module needs a reinstall, so the
# install stamp depends on the list of package files (rewritten only when it changes).
PKGFILES := $(sort $(wildcard stepsource/*.py stepsource/*/*.py aggregates/*.py projections/*.py adapters/*.py adapters/*/*.py engine/*.py))
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
	cd / && $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml

# the bench extra comes first so that tests/test_bench_harness.py runs the quick benchmark
# (bench-quick's code path) inside the suite instead of skipping it
test: lint $(BENCH_STAMP)
	$(BIN)/pytest

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

# The kill loop (tests/test_chaos.py, docs/reliability.md) with 100 SIGKILLs on each backend;
# `make test` runs it with a few. STEPSOURCE_CHAOS_SEED=N repeats a run's random choices and
# STEPSOURCE_CHAOS_REPORT=DIR saves each backend's figures as JSON.
.PHONY: chaos
CHAOS_KILLS ?= 100

chaos: $(STAMP)
	STEPSOURCE_CHAOS_KILLS=$(CHAOS_KILLS) $(BIN)/pytest tests/test_chaos.py -k kill_loop -s -rA

clean:
	rm -rf $(VENV) build *.egg-info stepsource.db stepsource.db-wal stepsource.db-shm
