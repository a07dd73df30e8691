# Two entry points, both self-contained on a fresh machine:
#   make lab   - install everything, start JupyterLab on notebooks/
#   make test  - install everything, fetch SmolLM2 once, run unit tests + kernels + notebooks
#   make figures - redraw figures/ from benchmarks/results/*.json (measures nothing)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU-only machines get this CPU build of torch (it lies on disk on our dev/CI machines);
# a torch that is already importable (e.g. a GPU user's CUDA build) is kept as it is.
CPU_TORCH ?= 2.13.0
STAMP  := $(VENV)/.installed
# make test runs the tests in this many processes (pytest-xdist), one per core up to 4 (each
# worker loads the model; tests/conftest.py gives each worker its share of the cores' threads)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install lab test model figures clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install torch; \
	else \
		$(BIN)/python -m pip install "torch==$(CPU_TORCH)"; \
	fi
	$(BIN)/python -m pip install -e ".[dev,notebooks]"
	touch $@

model: $(STAMP)
	$(BIN)/python -m tinyserve.weights.registry fetch smollm2

lab: model
	$(BIN)/jupyter lab --notebook-dir=notebooks

# --dist loadfile: a file's tests stay in one worker, so a notebook's cells run in order in one
# kernel and a module's session fixtures load once
test: model
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --nbval-lax -p no:cacheprovider \
		--durations=15 tests notebooks

# deterministic: an unchanged result redraws to the same PNG bytes (tests/test_figures.py)
figures: $(STAMP)
	$(BIN)/python -m tinyserve.bench figures

clean:
	rm -rf $(VENV)
