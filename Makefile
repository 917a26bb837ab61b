# `make install` sets up .venv with the CPU build of torch; GPU users: see README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install test test-fast lint bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,mp4]"

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check smd_cli tests benchmarks

bench:
	$(BIN)/python -m benchmarks.run_all
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
