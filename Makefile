# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install the project into it; nothing else has to happen first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every install takes exactly the versions last tested: constraints.txt pins each package, the
# transitive ones and torch included (`make lock` regenerates it). A machine without an NVIDIA
# driver gets PyTorch's CPU build of the pinned torch (never the multi-GB CUDA wheels); one with a
# driver gets the CUDA build of the same version, with the Triton that build pins for itself.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOCK := constraints.txt
TORCH_SPEC ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
TORCH_PIP_ARGS ?=
# Tests and the CI profile run the Triton kernels in Triton's CPU interpreter when there is no GPU;
# the demo uses the torch references there (the interpreter is for checking numerics, not speed).
INTERPRET := TRITON_INTERPRET=$(if $(HAS_GPU),0,1)

.PHONY: setup demo test test-latest bench-ci lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(HAS_GPU),grep -v '^triton==' $(LOCK),cat $(LOCK)) > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt --upgrade pip
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

# Starts fresh: rerunning the same torchrun command by hand instead resumes from runs/demo.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/torchrun --nproc_per_node 2 limo/engine/train.py --config configs/demo.toml

# The suite is mostly processes of its own (torchrun runs, command lines), so it runs on
# TEST_WORKERS pytest workers (pytest-xdist): 18-20 min on a 2-core machine, against 24 on one.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(INTERPRET) $(PY) -m pytest -q -n $(TEST_WORKERS)

# The CI regression profile: deterministic CPU figures against the committed baseline, and every
# Triton kernel compiled for Hopper (sm_90) and Ampere (sm_80) without a GPU: a spill, or registers
# past an occupancy step, against benchmarks/results/compile-sm*.json fails (limo/kernels/compile_check.py;
# it must run without TRITON_INTERPRET). On a GPU, also the kernel benchmarks' timings against
# benchmarks/results/<device>.json when one exists.
bench-ci: $(STAMP)
	$(INTERPRET) $(PY) -m benchmarks.regression --out runs/bench-ci/regression.json
	$(PY) -m benchmarks.compare runs/bench-ci/regression.json benchmarks/results/ci-baseline.json
	for arch in 90 80; do \
	  env -u TRITON_INTERPRET $(PY) -m limo.kernels.compile_check --arch $$arch --json > runs/bench-ci/compile-sm$$arch.json && \
	  $(PY) -m benchmarks.compare runs/bench-ci/compile-sm$$arch.json benchmarks/results/compile-sm$$arch.json || exit 1; \
	done
	$(if $(HAS_GPU),PYTHON=$(PY) OUT=runs/bench-ci bash benchmarks/gpu_suite.sh compare)

# The newest versions pyproject.toml allows (torch excepted: the locked CPU build, as a CPU machine
# must), in a venv of their own, on a fast subset: packaging and imports, HF parity, one training
# run with its export, one sampler run. `.ci/run` runs it after `make test`. When an upstream
# release breaks us and the fix is not ours, pyproject.toml gets an upper bound naming it.
LATEST := .venv-latest
LATEST_TESTS := tests/test_packaging.py tests/test_model.py::test_logits_match_transformers \
	tests/test_model.py::test_gradients_match_transformers \
	tests/test_train.py::test_export_loads_in_transformers_with_the_checkpoints_logits \
	tests/test_sampler.py::test_greedy_matches_transformers_with_preemption_and_forks
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch.txt "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch.txt --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|kernels|huggingface.hub|tokenizers|safetensors|triton|math.verify)==' | tr '\n' ' '; echo
	$(INTERPRET) $(LATEST)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) $(LATEST_TESTS)

# Regenerates constraints.txt: the newest versions pyproject.toml allows today, resolved in a fresh
# venv (torch: the CPU build of the version pinned now; pass TORCH_SPEC=torch==X to move it). Run
# `make test` on the result before committing it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet ".[test]"
	{ echo "# Every package \`make setup\` installs, at the version last tested (CPU, Python 3.11)."; \
	  echo "# Regenerate with \`make lock\`; the Makefile passes this file to pip as constraints."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude limo-engine | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache
