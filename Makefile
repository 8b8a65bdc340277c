# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install the project into it; nothing else has to happen first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A machine without an NVIDIA driver gets PyTorch's CPU build (never the multi-GB CUDA wheels);
# elsewhere pass e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.10,torch==2.13.0)
TORCH_PIP_ARGS ?=
# Tests and the CI profile run the Triton kernels in Triton's CPU interpreter when there is no GPU;
# the demo uses the torch references there (the interpreter is for checking numerics, not speed).
INTERPRET := TRITON_INTERPRET=$(if $(HAS_GPU),0,1)

.PHONY: setup demo test bench-ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Starts fresh: rerunning the same torchrun command by hand instead resumes from runs/demo.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/torchrun --nproc_per_node 2 engine/train.py --config configs/demo.toml

test: $(STAMP)
	$(INTERPRET) $(PY) -m pytest -q

# The CI regression profile: deterministic CPU figures against the committed baseline, and every
# Triton kernel compiled for Hopper (sm_90) and Ampere (sm_80) without a GPU: a spill, or registers
# past an occupancy step, against benchmarks/results/compile-sm*.json fails (kernels/compile_check.py;
# it must run without TRITON_INTERPRET). On a GPU, also the kernel benchmarks' timings against
# benchmarks/results/<device>.json when one exists.
bench-ci: $(STAMP)
	$(INTERPRET) $(PY) -m benchmarks.regression --out runs/bench-ci/regression.json
	$(PY) -m benchmarks.compare runs/bench-ci/regression.json benchmarks/results/ci-baseline.json
	for arch in 90 80; do \
	  env -u TRITON_INTERPRET $(PY) -m kernels.compile_check --arch $$arch --json > runs/bench-ci/compile-sm$$arch.json && \
	  $(PY) -m benchmarks.compare runs/bench-ci/compile-sm$$arch.json benchmarks/results/compile-sm$$arch.json || exit 1; \
	done
	$(if $(HAS_GPU),PYTHON=$(PY) OUT=runs/bench-ci bash benchmarks/gpu_suite.sh compare)

clean:
	rm -rf runs .pytest_cache
