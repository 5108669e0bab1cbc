# The README's commands. Each target installs what it needs from nothing: a fresh clone runs `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core, at most 4; 0 runs the suite in this process.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')
DEMO_MINUTES ?= 10
DEMO_RUN := runs/dinov2_fashion_mnist

.PHONY: install data slurm demo baseline test bench clean

# Reinstalled whenever setup.py (the one list of dependencies) changes.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(STAMP)

data:
	tools/get_fashion_mnist.sh

# SLURM's daemons and commands, for the tests that bring up a one-node cluster on loopback.
slurm:
	tools/get_slurm.sh

# The main job: DINOv2 (DINO + iBOT + KoLeo) on Fashion-MNIST for DEMO_MINUTES of training, then kNN against raw
# pixels and the random initialisation, attention maps and the loss curve. Each demo starts afresh in $(DEMO_RUN).
# DINO alone on the same network: distill train configs/demo/dino_fashion_mnist.yaml
demo: install data
	rm -rf $(DEMO_RUN)
	$(BIN)/distill train configs/dinov2/dinov2_fashion_mnist.yaml train.time_limit_minutes=$(DEMO_MINUTES) \
		train.output_dir=$(DEMO_RUN)

# The kNN baselines alone: raw pixels and randomly initialised ViTs (a few minutes).
baseline: install data
	$(BIN)/distill baseline configs/demo/baseline.yaml

test: install data slurm
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Speed figures, each a ratio measured side by side in one run, written to docs/benchmarks.md (about 15 minutes,
# and as long again on a CPU beyond AVX2, where the training and data figures are rerun on AVX2 kernels).
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 BENCH_RESULTS=runs/bench/avx2
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): setup.py $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	touch $@

bench: install data $(BENCH_STAMP)
	$(BIN)/python tools/bench_train.py
	$(BIN)/python tools/bench_data.py
	$(BIN)/python tools/bench_embed.py
	$(BIN)/python tools/bench_dense.py
	$(BIN)/python tools/bench_onnx.py
	rm -rf runs/bench/avx2
	if [ "$$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" != AVX2 ]; then \
		$(AVX2_KERNELS) $(BIN)/python tools/bench_train.py && $(AVX2_KERNELS) $(BIN)/python tools/bench_data.py; fi
	$(BIN)/python tools/bench_report.py

clean:
	rm -rf $(VENV) .data runs .pytest_cache *.egg-info
