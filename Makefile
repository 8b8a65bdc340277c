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
# Under no GPU, Triton kernels run in Triton's CPU interpreter.
export TRITON_INTERPRET ?= $(if $(HAS_GPU),0,1)

.PHONY: setup demo test bench-ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.weights --preset tiny --out runs/demo/hf --check

test: $(STAMP)
	$(PY) -m pytest -q

# The CI regression profile: deterministic CPU figures against the committed baseline. On a GPU,
# also the kernel benchmarks' timings against benchmarks/results/<device>.json when one exists.
bench-ci: $(STAMP)
	$(PY) -m benchmarks.regression --out runs/bench-ci/regression.json
	$(PY) -m benchmarks.compare runs/bench-ci/regression.json benchmarks/results/ci-baseline.json

clean:
	rm -rf runs .pytest_cache
