# ConceptLens — every set-up step from a machine that has only Python 3.11 (and apt, as root, for chromium).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKSPACE ?= $(CURDIR)/workspace
export CONCEPTLENS_WORKSPACE := $(WORKSPACE)
HOST ?= 127.0.0.1
PORT ?= 8050
WORKERS ?= 2
MLFLOW_PORT ?= 5000
DEMO_CONFIG := training/configs/demo.yaml


.PHONY: help install browser services data train extract accounts serve demo team test test-fast bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: the CPU build lies on this machine's disk; a bare "torch" would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,team]'
	touch $@

install: $(VENV)/.installed browser  ## create .venv and install ConceptLens with test and team extras

browser:  ## Debian chromium + chromedriver for the browser tests (never a downloaded browser)
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

services:  ## start PostgreSQL and Redis on loopback if they are installed and not running
	@bash tests/services.sh

data: $(VENV)/.installed  ## build the demo dataset from the real CBIS-DDSM mammograms
	$(BIN)/python -m training build-demo

train: data  ## train the demo model (reuses the registered model when data and config are unchanged)
	$(BIN)/python -m training fit --config $(DEMO_CONFIG)

extract: train  ## extract activations of the registered model into the demo zarr store
	$(BIN)/python -m store extract --model models:/conceptlens-demo@champion --data demo --out demo --replace
	$(BIN)/python -m explain maps --store demo

accounts: $(VENV)/.installed  ## demo accounts (radiologist, researcher, admin) in $(WORKSPACE)/demo-accounts.txt
	$(BIN)/python -m store users demo

serve: extract accounts  ## serve the workbench on http://$(HOST):$(PORT)
	@echo "ConceptLens: open http://$(HOST):$(PORT)/ and log in with an account from $(WORKSPACE)/demo-accounts.txt"
	$(BIN)/python -m vis serve --host $(HOST) --port $(PORT)

demo: install serve  ## everything: install, build data, train, extract, accounts, serve

team: install services  ## the team stack: mlflow + annotations on PostgreSQL, Celery on Redis, gunicorn (docs/TEAM.md)
	$(BIN)/python -m vis team --prepare --store team --workers $(WORKERS) --host $(HOST) --port $(PORT) --mlflow-port $(MLFLOW_PORT)

test: install  ## the whole test suite (real data, real browser, real services)
	$(BIN)/python -m pytest -q

test-fast: install  ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

bench: extract  ## benchmarks; figures printed next to their goals and written to workspace/bench/results.json
	$(BIN)/python tests/benchmarks/run.py

clean:  ## remove the workspace (keeps .venv)
	rm -rf $(WORKSPACE)
