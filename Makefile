# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
# Where pip finds torch (the torch step only). Empty: pip's configured indexes. For CPU wheels from
# PyTorch's own index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (its 2.13.0+cpu still satisfies the pin torch==2.13.0: a pin without a local label ignores it).
TORCH_INDEX ?=

.PHONY: help demo test test-fast lint bench gpu-check clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, from the pins, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(PIP) install --quiet -c constraints.txt -e '.[examples,test,dev]'
	touch $(STAMP)

demo: $(STAMP)  ## set up .venv, train the example app (dp on the digits)
	$(PY) examples/train.py

test: $(STAMP)  ## set up .venv, run the whole test suite
	$(PY) -m pytest

test-fast: $(STAMP)  ## the edit loop: no subprocess or end-to-end tests
	$(PY) -m pytest -m 'not slow' -q

lint: $(STAMP)  ## ruff, ruff format --check, mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)  ## run every benchmark script
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

# The CUDA tests, the GPU benchmark rows and peak memory, one Markdown report under benchmarks/results/
# (and $$OUT). Installs nothing (a GPU machine may have no package index): it runs with .venv when that
# exists, else with $(PYTHON); `make gpu-check PY=python3` picks the interpreter. A missing package is
# named with the commands that bring it offline. Without a GPU it says so and fails. GPU_CHECK_ARGS=--quick
gpu-check:  ## on a GPU machine: CUDA tests, GPU benchmarks, a report (installs nothing)
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:  ## remove .venv and run outputs
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache .mypy_cache .ruff_cache
