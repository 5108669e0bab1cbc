# The README's commands. Each target installs what it needs from nothing: a fresh clone runs `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data demo test bench clean

# Reinstalled whenever setup.py (the one list of dependencies) changes.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(STAMP)

data:
	tools/get_fashion_mnist.sh

# The main job: the kNN baselines on Fashion-MNIST (raw pixels, randomly initialised ViT).
demo: install data
	$(BIN)/distill baseline configs/demo/baseline.yaml

test: install data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python tools/bench_backbone.py

clean:
	rm -rf $(VENV) .data runs .pytest_cache *.egg-info
