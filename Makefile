# Fresh machine: `make demo` and `make test` create .venv, install the CPU torch wheel first
# (a bare `torch` requirement would pull gigabytes of CUDA packages), then maskformer with
# --no-build-isolation so the optional C++ extension builds against the installed torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.maskformer-installed

.PHONY: setup demo test bench bench-e2e clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: the shipped small model, trained on generated shapes only.
demo: setup
	$(BIN)/maskformer demo --out out/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

# Kernel micro-benchmarks (pytest-benchmark; every entry verifies against the reference first;
# Triton/CUDA entries skip with "no CUDA device" on a CPU machine) and the post-processing
# comparisons that write benchmarks/results/*.json and .md.
bench: setup
	$(BIN)/python -m pytest -q benchmarks/bench_ops.py benchmarks/bench_postprocess.py benchmarks/bench_panoptic.py benchmarks/bench_window_attention.py --benchmark-only
	$(BIN)/python -m benchmarks.bench_postprocess
	$(BIN)/python -m benchmarks.bench_panoptic

# End to end against transformers (slow on a CPU: Swin-T at 512x683 is seconds per image).
bench-e2e: setup
	$(BIN)/maskformer bench --models tiny --batches 1,2

clean:
	rm -rf build *.egg-info out .pytest_cache maskformer/_C*.so
