"""benchmarks/bench_sampler.py: the smoke sweep end to end (records, roofline arithmetic, the
transformers comparator on the same folder, greedy agreement), and the byte accounting by hand."""

import json
import re
import statistics

import pytest
import torch

from benchmarks import bench_sampler as bench
from limo.model.qwen2 import build_model

SMOKE = bench.SWEEPS["smoke"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler") / "sampler.json"
    status = bench.main(["--sweep", "smoke", "--device", DEVICE, "--out", str(out)])
    return status, json.loads(out.read_text())


def test_one_record_per_provider_batch_and_mode(smoke_run):
    status, result = smoke_run
    assert status == 0 and result["bench"] == "sampler" and result["sweep"] == "smoke"
    keys = {(r["provider"], r["case"]["batch"], r["mode"]) for r in result["records"]}
    assert keys == {(p, b, m) for p in ("ours", "transformers") for b in SMOKE.batches for m in ("prefill", "decode")}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in result["records"])


def test_decode_is_judged_against_the_bandwidth_roofline(smoke_run):
    _, result = smoke_run
    bw = result["ceilings"]["copy_gbps"] * 1e9
    for r in result["records"]:
        if r["mode"] != "decode":
            continue
        e, n, batch = r["extra"], r["case"]["new_tokens"], r["case"]["batch"]
        step_bytes = statistics.fmean(result["weight_bytes"] + batch * result["model"]["hidden_size"] * 4
                                      + batch * (SMOKE.prompt + i) * result["kv_bytes_per_token"] for i in range(1, n))  # fmt: skip
        assert r["work"]["bytes"] == int(step_bytes)
        assert e["roofline_tokens_per_s"] == pytest.approx(batch * bw / step_bytes)
        assert r["fraction_of_ceiling"] == pytest.approx(e["tokens_per_s"] / e["roofline_tokens_per_s"], rel=1e-6)
        assert e["tokens_per_s"] == pytest.approx(batch / (r["median_ms"] / 1e3))
        if r["provider"] == "ours":
            (theirs,) = [t for t in result["records"] if (t["provider"], t["mode"], t["case"]["batch"]) == ("transformers", "decode", batch)]
            assert e["vs_transformers"] == pytest.approx(e["tokens_per_s"] / theirs["extra"]["tokens_per_s"])


def test_both_samplers_ran_the_same_model(smoke_run):
    """float32, tiny: no near-tie flips an argmax, so greedy outputs agree token for token."""
    _, result = smoke_run
    assert result["greedy_agreement"] == {"tokens_compared": SMOKE.new_tokens, "identical_prefix": SMOKE.new_tokens}


def test_byte_accounting_by_hand():
    """Weights read per step: every parameter but the untied embedding table, plus B of its rows."""
    args = SMOKE.args
    model = build_model(args, device="meta")
    table = model.embed_tokens.weight.numel()
    every = sum(p.numel() for p in model.parameters())
    assert bench.decode_weight_bytes(args, 4, 3) == (every - table + 3 * args.hidden_size) * 4
    kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * 2
    assert bench.kv_bytes_per_token(args, 2) == kv
    # steps i = 1..4 attend over 8 + i tokens: mean 10.5
    assert bench.decode_step_bytes(args, 2, 3, 8, 5) == pytest.approx(bench.decode_weight_bytes(args, 2, 3) + 3 * 10.5 * kv)


def test_bad_batches_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        bench.main(["--sweep", "smoke", "--batches", "2"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("error: ") and re.search(r"batches \[2\] must be among \[1, 3\]", err), err


def test_host_mode_measures_the_host_side_with_a_null_model(tmp_path, capsys):
    """--host: a null model (fixed logits), 16 samples per prompt, a KV budget that preempts."""
    out = tmp_path / "host.json"
    assert bench.main(["--host", "--batches", "1,32", "--out", str(out)]) == 0
    rows = {r["batch"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[1]["samples_per_prompt"] == 1 and rows[32]["samples_per_prompt"] == 16
    assert rows[32]["preemptions"] > 0 and rows[32]["decode_steps"] > 90  # 96 new tokens, recomputes included
    for r in rows.values():
        assert 0 < r["host_us_per_step"] and r["host_us_per_sequence"] == pytest.approx(r["host_us_per_step"] / r["batch"])
        assert r["host_units_per_step"] == pytest.approx(r["host_us_per_step"] / r["python_unit_us"]) and r["python_unit_us"] > 0
    assert "us per step" in capsys.readouterr().out


def test_contexts_mode_times_decode_steps_by_context(tmp_path):
    from benchmarks.bench_sampler_cpu import context_steps

    rows = context_steps([32, 128], batch=4, new_tokens=3)
    assert [r["context"] for r in rows] == [32, 128]
    assert all(0 < r["attention_ms_per_step"] and 0 < r["ms_per_step"] for r in rows)
