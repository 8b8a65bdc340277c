"""benchmarks/bench_train_step.py: the smoke sweep end to end (every config recorded, OOM recorded and
survived, the fit's arithmetic, the loss the step computes), and its micro-batches."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from benchmarks import bench_train_step as bench
from limo.data import lengths
from limo.model.qwen2 import build_model

SMOKE = bench.SWEEPS["smoke"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer_params(args) -> int:
    model = build_model(replace(args, num_layers=1), device="meta")
    return sum(p.numel() for p in model.layers[0].parameters())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke sweep, with the "none" checkpointing config made to run out of memory."""
    out = tmp_path_factory.mktemp("train") / "train_step.json"
    real = bench._run

    def oom_for_none(sweep, config, d, batches):
        if config.ac == "none":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(sweep, config, d, batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "_run", oom_for_none)
        status = bench.main(["--sweep", "smoke", "--device", DEVICE, "--out", str(out)])
    return status, json.loads(out.read_text())


def test_every_config_is_recorded_and_oom_does_not_stop_the_sweep(smoke_run):
    status, result = smoke_run
    assert status == 0
    by_name = {r["extra"]["name"]: r for r in result["records"]}
    assert list(by_name) == [c.name for c in SMOKE.configs]
    for name, r in by_name.items():
        if "-none-" in name:
            assert r["status"].startswith("oom: CUDA out of memory") and r["median_ms"] is None
        elif name.startswith("liger") and DEVICE == "cpu":
            assert r["status"].startswith("unavailable: Liger's kernels run on CUDA only")
        else:
            assert r["status"] == "ok", r
            e = r["extra"]
            assert e["step_ms"] == pytest.approx(e["fwd_bwd_ms"] + e["optim_ms"], rel=0.05)  # medians of sums vs sums of medians
            assert e["tokens_per_s"] == pytest.approx(e["tokens_per_step"] / (r["median_ms"] / 1e3))
        assert r["extra"]["plan_peak_gib"] > 0 and isinstance(r["extra"]["plan_fits"], bool)  # the planner, even for failed configs
    assert by_name["triton-full-eager-L2"]["extra"]["tokens_per_step"] == sum(sum(mb["seqlens"]) for mb in result["micro_batches"])


def test_the_step_computes_the_same_loss_whatever_the_kernels_and_checkpointing(smoke_run):
    """Same init and batches: the first step's loss is that of near-uniform logits over the vocab,
    and equal across backends (Triton vs torch: to rounding) and checkpointing modes (exactly)."""
    _, result = smoke_run
    loss = {r["extra"]["name"]: r["extra"]["first_loss"] for r in result["records"] if r["status"] == "ok"}
    for name, value in loss.items():
        assert abs(value - math.log(SMOKE.args.vocab_size)) < 0.05, (name, value)
    assert loss["triton-full-eager-L2"] == pytest.approx(loss["torch-full-eager-L2"], rel=1e-5)
    assert loss["torch-selective-eager-L2"] == loss["torch-full-eager-L2"]
    assert loss["triton-full-eager-L1"] != loss["triton-full-eager-L2"]


def test_the_per_layer_fit_is_the_line_through_the_two_depths(smoke_run):
    _, result = smoke_run
    by_name = {r["extra"]["name"]: r["extra"] for r in result["records"]}
    (fit,) = [f for f in result["fits"] if f["group"] == "triton-full-eager"]
    one, two = by_name["triton-full-eager-L1"], by_name["triton-full-eager-L2"]
    assert fit["per_layer_ms"] == pytest.approx(two["fwd_bwd_ms"] - one["fwd_bwd_ms"])
    assert fit["rest_ms"] == pytest.approx(2 * one["fwd_bwd_ms"] - two["fwd_bwd_ms"])
    seqlens = [n for mb in result["micro_batches"] for n in mb["seqlens"]]
    a = SMOKE.args
    want_layer = 6 * _layer_params(a) * sum(seqlens) + 6 * a.num_heads * a.head_dim * sum(n * n for n in seqlens)
    assert fit["layer_flops"] == pytest.approx(want_layer, rel=1e-12)
    assert fit["head_flops"] == 6 * a.vocab_size * a.hidden_size * sum(seqlens)
    gparams = [build_model(replace(a, num_layers=k), device="meta") for k in (1, 2)]
    g = [sum(p.numel() for p in m.parameters()) / 1e9 for m in gparams]
    optim = [one["optim_ms"], two["optim_ms"]]
    assert fit["optim_ms_per_gparam"] == pytest.approx((optim[0] * g[0] + optim[1] * g[1]) / (g[0] ** 2 + g[1] ** 2))
    assert [f["group"] for f in result["fits"]] == ["triton-full-eager"]  # the other groups have one depth only


def test_memory_is_held_against_the_planner_on_cuda_only(smoke_run):
    _, result = smoke_run
    for r in result["records"]:
        if r["status"] == "ok":
            e = r["extra"]
            if DEVICE == "cuda":
                assert e["plan_rel_error"] == pytest.approx((e["plan_peak_gib"] - e["peak_reserved_gib"]) / e["peak_reserved_gib"])
                assert e["mfu"] is None or e["mfu"] > 0
            else:
                assert "plan_rel_error" not in e and e["mfu"] is None and e["mfu_torchtitan"] is None


def test_micro_batches_pack_proxy_lengths_within_the_budget():
    budget = 256
    mbs = bench.micro_batches(vocab_size=203, budget=budget, count=3, seed=1)
    scale = budget / lengths.LIMO_CUTOFF
    possible = {max(2, min(budget, round(n * scale))) for n in lengths.load()}
    assert len(mbs) == 3
    for mb in mbs:
        seqlens = mb.cu_seqlens.diff().tolist()
        assert len(mb) == sum(seqlens) <= budget and set(seqlens) <= possible
        assert int(mb.input_ids.max()) < 203 and mb.max_seqlen == max(seqlens)
        prompts = [max(1, min(n // 8, 256)) for n in seqlens]  # unsupervised; shifted, a sample's targets are tokens 1 .. n-1
        assert mb.num_label_tokens == int((mb.labels != -100).sum()) == sum(n - p for n, p in zip(seqlens, prompts))
    again = bench.micro_batches(vocab_size=203, budget=budget, count=3, seed=1)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(mbs, again))
    other = bench.micro_batches(vocab_size=203, budget=budget, count=3, seed=2)
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(mbs, other))


def test_unknown_configs_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        bench.main(["--sweep", "smoke", "--configs", "triton-full-eager-L9"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("error: ") and re.search(r"unknown configs \['triton-full-eager-L9'\]", err), err
