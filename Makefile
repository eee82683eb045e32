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

.PHONY: demo test lint bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, from the pins, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(PIP) install --quiet -c constraints.txt -e '.[examples,test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

# On a GPU machine: the CUDA tests, the GPU benchmark rows and peak memory, one Markdown report under
# benchmarks/results/ (and $$OUT). Without a GPU it says so and fails.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache .mypy_cache .ruff_cache
