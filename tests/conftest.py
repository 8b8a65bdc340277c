"""Shared test helpers: the ../shared data folder, random tiny Qwen2 models, error metrics."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before any
# @triton.jit function is defined, so before the kernels package is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
# torchrun as the tests launch it: --standalone puts each run's rendezvous on a free port, so runs in
# parallel test workers (`make test` runs pytest -n 2) never meet on torchrun's default port 29500.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def shared_path(*parts: str) -> Path:
    """A file under ../shared; missing is a failure in CI and a skip (saying why) elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing: the shared data folder must sit beside the project as ../shared"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `make(folder)` fills, made once per test session: under `make test` (pytest -n 2)
    both workers share it, the first to ask makes it under a lock and the other waits for it. A
    reference training run costs 15-30 s, so a module fixture that each worker made for itself cost
    that twice. Tests only read it (those that resume a run copy it first)."""
    base = tmp_path_factory.getbasetemp()
    if base.name.startswith("popen-gw"):
        base = base.parent  # an xdist worker's folder: the session's is the one above
    folder, done = base / f"made-once-{name}", base / f"made-once-{name}.done"
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when make() raises
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a make() that failed left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, computed in float64."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def random_hf_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """transformers' Qwen2ForCausalLM with every weight random (biases and norms included)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=203, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**kw)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def ours_from_hf(hf_model, dtype: torch.dtype | None = None):
    """Our Qwen2 holding the same weights as a transformers model."""
    from limo.model.qwen2 import ModelArgs, build_model
    from limo.model.weights import hf_name

    args = ModelArgs.from_hf(hf_model.config.to_dict())
    dtype = dtype or next(hf_model.parameters()).dtype
    model = build_model(args, device="cpu", dtype=dtype)
    theirs = hf_model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theirs[hf_name(name)])
    return model.eval()
