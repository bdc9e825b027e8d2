# Fresh machine: `make demo` and `make test` create .venv, install the CPU torch wheel first
# (a bare `torch` requirement would pull gigabytes of CUDA packages), then maskformer with
# --no-build-isolation so the optional C++ extension builds against the installed torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.maskformer-installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default (a small built-in configuration with UNTRAINED weights).
demo: setup
	$(BIN)/maskformer demo --out out/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info out .pytest_cache maskformer/_C*.so
