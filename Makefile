# Entry points for a fresh Debian machine. Each target runs scripts/setup.sh first; it is
# idempotent and returns at once when nothing changed. Services needed by the tests (Redis,
# PostgreSQL, an S3 server, Celery workers, Flower) are started by pytest fixtures, not here.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test processes: most integration tests wait on real processes and timers, so two share the
# 2-core CI machine well (about half the wall time); each file's tests stay in one process,
# with its own services. PYTEST_WORKERS=0 runs them all in this process.
PYTEST_WORKERS ?= 2

# Passed through so that a missing service fails the tests in CI instead of skipping them.
export CI
export ZW_VENV := $(VENV)

.PHONY: help setup setup-demo setup-python demo test test-unit bench lint format clean

help:
	@echo "make demo       run examples/quickstart.py (no servers needed)"
	@echo "make test       all tests; starts redis/postgres/s3/celery/flower itself"
	@echo "make test-unit  unit tests only (no services)"
	@echo "make bench      benchmarks (python -m bench)"
	@echo "make lint       ruff check, ruff format --check, mypy"
	@echo "make setup      install system packages and $(VENV) (scripts/setup.sh)"
	@echo "make clean      remove caches and build leftovers (keeps $(VENV) and .zw/)"

setup:
	scripts/setup.sh

setup-demo:
	scripts/setup.sh --demo

setup-python:
	scripts/setup.sh --no-services

demo: setup-demo
	$(PYTHON) examples/quickstart.py

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PYTHON) -m pytest -q tests -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-unit: setup-python
	$(PYTHON) -m pytest -q tests/unit $(PYTEST_ARGS)

bench: setup
	$(PYTHON) -m bench

lint: setup-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup-python
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info .stamp*
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
