import math

import pytest
import torch

from limo.engine.config import OptimConfig
from limo.engine.optim import AdamWLowPrecisionState, build_optimizer, lr_lambda, param_groups
from limo.model.qwen2 import PRESETS, build_model


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(PRESETS["tiny"], device="cpu")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_shapes():
    cfg = OptimConfig(warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg, 100)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    limo = lr_lambda(OptimConfig(), 390)  # LIMO: no warmup, cosine to 0
    assert limo(0) == 1.0 and limo(195) == pytest.approx(0.5) and limo(390) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda(OptimConfig(schedule="linear"), 10)
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda(OptimConfig(schedule="constant", warmup_ratio=0.5), 10)(7) == 1.0


def _run(make_opt, steps=20, dtype=torch.float64):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(37, 13, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(13, dtype=dtype))
    x = torch.randn(64, 37, dtype=dtype)
    opt = make_opt([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    for _ in range(steps):
        loss = ((x @ w + b).tanh() - 0.3).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return w.detach().clone(), b.detach().clone()


def test_low_precision_adamw_with_fp64_states_is_exactly_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = _run(lambda g: AdamWLowPrecisionState(g, weight_decay=0.1, state_dtype=torch.float64, **kw))
    ref = _run(lambda g: torch.optim.AdamW(g, foreach=False, **kw))
    for a, r in zip(ours, ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-14)


def test_bf16_states_drift_is_bounded():
    """bf16 moments round each stored value by <= 2^-9 relative; over 20 steps at lr 1e-2 the
    parameters must stay within a small fraction of the distance they travelled."""
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    start = _run(lambda g: AdamWLowPrecisionState(g, state_dtype=torch.float32, **kw), steps=0, dtype=torch.float32)
    exact = _run(lambda g: AdamWLowPrecisionState(g, state_dtype=torch.float32, **kw), dtype=torch.float32)
    bf16 = _run(lambda g: AdamWLowPrecisionState(g, state_dtype=torch.bfloat16, **kw), dtype=torch.float32)
    for s, e, b in zip(start, exact, bf16):
        travelled = (e - s).norm()
        assert (b - e).norm() / travelled < 2e-2
        assert not torch.equal(b, e)  # the bf16 path really ran


def test_bf16_states_survive_a_save_and_load_bitwise():
    """Stopping after 7 steps, reloading the optimizer's state into a fresh one and going on gives
    the uninterrupted run's parameters bit for bit; the moments stay bf16."""
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, state_dtype=torch.bfloat16)
    torch.manual_seed(0)
    w0, x = torch.randn(37, 13), torch.randn(64, 37)

    def steps(w, opt, n):
        for _ in range(n):
            ((x @ w).tanh() - 0.3).square().mean().backward()
            opt.step()
            opt.zero_grad()

    w = torch.nn.Parameter(w0.clone())
    steps(w, AdamWLowPrecisionState([w], **kw), 12)
    w_resumed = torch.nn.Parameter(w0.clone())
    first = AdamWLowPrecisionState([w_resumed], **kw)
    steps(w_resumed, first, 7)
    saved = first.state_dict()
    second = AdamWLowPrecisionState([w_resumed], **kw)
    second.load_state_dict(saved)
    state = second.state[w_resumed]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    steps(w_resumed, second, 5)
    assert torch.equal(w_resumed, w)


def test_build_optimizer_picks_the_implementation():
    model = build_model(PRESETS["tiny"], device="cpu")
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"]
    low = build_optimizer(model, OptimConfig(state_dtype="bfloat16"), torch.device("cpu"))
    assert isinstance(low, AdamWLowPrecisionState) and low.state_dtype == torch.bfloat16
    assert math.isclose(opt.defaults["lr"], 5e-6)
