# Fresh machine: `make demo` and `make test` create .venv, install the CPU torch wheel first
# (a bare `torch` requirement would pull gigabytes of CUDA packages), then maskformer's
# dependencies, then maskformer itself with --no-build-isolation so the optional C++ extension
# builds against the installed torch. Each step says what it does and how long it took "on a busy
# 2-core machine": a clean clone's `PIP_NO_CACHE_DIR=1 make demo` on this project's 2-core AMD
# EPYC, shared with other jobs (load average 10 to 27), packages from a local index, 2026-12-06:
# 11 min 11 s in all; a download over a slow network adds its own time. When a step ends it says
# how long it took this time.
comma := ,
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.maskformer-installed
# The torch and dependency steps print pip's progress (the downloads are the long part where the
# network is slow); the C++ compiler prints nothing until it is done.
PIP_PROGRESS ?= --progress-bar on
STEP = @echo "make setup [$(1)/4]: $(2)"; t0=$$(date +%s); $(3) && echo "make setup [$(1)/4]: done in $$(( $$(date +%s) - t0 )) s"

.PHONY: setup demo test test-oracle-latest bench bench-e2e aot gpu-model gpu-report gpu-report-dry-run clean

$(STAMP): setup.py
	$(call STEP,1,creating $(VENV) (12 s on a busy 2-core machine),test -x $(BIN)/python || $(PYTHON) -m venv $(VENV))
	$(call STEP,2,installing torch $(TORCH_VERSION)$(comma) the CPU wheel (192 MB; 72 s on a busy 2-core machine),\
		$(BIN)/python -m pip install $(PIP_PROGRESS) torch==$(TORCH_VERSION))
	$(call STEP,3,installing the dependencies: transformers (the test oracle)$(comma) triton$(comma) onnx$(comma) \
		onnxruntime (+ onnxruntime-extensions)$(comma) openvino$(comma) NNCF$(comma) pytest (122 s on a busy 2-core machine),\
		MASKFORMER_BUILD_CPP=0 $(BIN)/python -m pip install $(PIP_PROGRESS) --no-build-isolation -e ".[test]")
	$(call STEP,4,installing maskformer and compiling its C++ extensions (csrc/: the CPU kernels and the OpenVINO extension; 448 s on a busy 2-core machine$(comma) \
		the compiler prints nothing meanwhile),$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .)
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: the shipped small model, trained on generated shapes only.
demo: setup
	@echo "make demo: segmenting a generated image with the shipped default model (17 s on a busy 2-core machine)"
	$(BIN)/maskformer demo --out out/demo --overwrite

test: setup
	@echo "make test: the whole suite, about 1320 tests (22 min on 2 quiet cores, several times that on a busy machine; a dot per test)"
	$(BIN)/python -m pytest -q tests

# The transformers-oracle tests again, against the newest transformers release (pinned in setup.py's
# "test-latest" extra, with the Hugging Face `kernels` package it depends on), in a second venv, from
# the repository root: what users have today, and proof that the checkout's kernels/ folder does not
# shadow their `kernels`. .ci/run runs it after `make test`.
LATEST_VENV ?= .venv-latest
LATEST_STAMP := $(LATEST_VENV)/.maskformer-installed
ORACLE_TESTS ?= tests/test_no_shadowing.py tests/test_parity_transformers.py tests/test_mask2former_parity.py \
	tests/test_dropin.py tests/test_dropin_processing.py tests/test_processing.py tests/test_mask2former_processing.py \
	tests/test_loss.py tests/test_mask2former_loss.py tests/test_loading.py tests/test_gpu_report.py

$(LATEST_STAMP): setup.py
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(LATEST_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[test-latest]"
	touch $(LATEST_STAMP)

test-oracle-latest: $(LATEST_STAMP)
	$(LATEST_VENV)/bin/python -m pytest -q $(ORACLE_TESTS)

# Kernel micro-benchmarks (pytest-benchmark; every entry verifies against the reference first;
# Triton/CUDA entries skip with "no CUDA device" on a CPU machine) and the post-processing
# comparisons that write out/benchmarks/*.json and .md (a new name when one is taken; see
# docs/benchmarks.md).
bench: setup
	$(BIN)/python -m pytest -q benchmarks/bench_ops.py benchmarks/bench_postprocess.py benchmarks/bench_panoptic.py benchmarks/bench_window_attention.py --benchmark-only
	$(BIN)/python -m benchmarks.bench_postprocess
	$(BIN)/python -m benchmarks.bench_panoptic

# End to end against transformers (slow on a CPU: Swin-T at 512x683 is seconds per image).
bench-e2e: setup
	$(BIN)/maskformer bench --models tiny --batches 1,2

# Ahead-of-time compile check (benchmarks/aot.py): every Triton kernel compiled for sm_80 and sm_90
# without a GPU; fails on compile errors, spills, missing tensor cores. AOT_FLAGS=--full for every
# real launch configuration (~15-20 minutes on 2 cores; the CI set, run by tests/test_aot.py, ~1).
aot: setup
	$(BIN)/python -m benchmarks.aot $(AOT_FLAGS)

# The GPU cost model (benchmarks/gpu_model.py), no GPU needed: the default set (Swin-T 512x683,
# Swin-L 640x640 and 640x853, batch 1 and 8, fp32 and bf16, H100 and H200) traced on fake CUDA
# tensors, its two constants fitted on the measured H200 rows; 66 s on the busy 2-core EPYC
# (2026-12-06). Writes $(GPU_MODEL_JSON) and the Markdown beside it (a new name when one is taken);
# GPU_MODEL_JSON=benchmarks/results/gpu-model.json GPU_MODEL_FLAGS=--overwrite replaces the
# committed results, which the GPU report prints its measured rows beside.
GPU_MODEL_JSON ?= out/benchmarks/gpu-model.json
GPU_MODEL_FLAGS ?=
gpu-model: setup
	$(BIN)/python -m benchmarks.gpu_model --json $(GPU_MODEL_JSON) $(GPU_MODEL_FLAGS)

# The GPU report (benchmarks/gpu_report.py), for a CUDA machine where torch, triton, transformers and
# pytest are installed: no .venv, no network; under 9 minutes. It installs this checkout offline
# first (no C++ build; if pip cannot, the report runs from the checkout, which maps kernels/
# itself) and, where $OUT is set (a lent machine whose tool returns at most 8 files), packs the
# folder into $OUT/gpu-report.tgz. Commit the folder it writes. A folder that already holds a
# report is refused (nothing is overwritten): GPU_REPORT_FLAGS=--overwrite writes over it.
GPU_REPORT_DIR ?= benchmarks/results/gpu-report
GPU_REPORT_BUDGET ?= 510
GPU_REPORT_FLAGS ?=
gpu-report:
	MASKFORMER_BUILD_CPP=0 $(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . \
		|| echo "gpu-report: offline install failed; running from the checkout"
	$(PYTHON) -m benchmarks.gpu_report --out $(GPU_REPORT_DIR) --budget $(GPU_REPORT_BUDGET) $(GPU_REPORT_FLAGS); status=$$?; \
	if [ -n "$$OUT" ]; then tar czf "$$OUT/gpu-report.tgz" -C $(dir $(GPU_REPORT_DIR)) $(notdir $(GPU_REPORT_DIR)); fi; \
	exit $$status

# Its plumbing on the CPU, tiny shapes (tests/test_gpu_report.py runs it in `make test`).
gpu-report-dry-run: setup
	$(BIN)/python -m benchmarks.gpu_report --dry-run --out out/gpu-report-dry-run --overwrite

clean:
	rm -rf build *.egg-info out .pytest_cache maskformer/_C*.so
