"""benchmarks/project.py on fake measurements: the arithmetic by hand, the choice of fit, and what it
says when measurements are missing (it never invents a figure)."""

import json
import re
from dataclasses import asdict

import pytest

from benchmarks import project
from limo.model.qwen2 import PRESETS, build_model

ARGS = PRESETS["qwen2.5-32b"]
L = 16384


def _counts():
    model = build_model(ARGS, device="meta")
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return total, layer


def fake_fit(**overrides) -> dict:
    """A bench step of one 16,384-token sample: its FLOPs counted here by hand, at round times."""
    _, layer = _counts()
    fit = dict(group="triton-full-eager", kernels="triton", ac="full", compile=False, state_dtype="bfloat16", layers=[2, 4], tokens=L,
               per_layer_ms=100.0, rest_ms=50.0, optim_ms_per_gparam=2.0, layer_mfu=0.5,
               layer_flops=6 * layer * L + 6 * ARGS.num_heads * ARGS.head_dim * L * L,
               head_flops=6 * ARGS.vocab_size * ARGS.hidden_size * L)  # fmt: skip
    return fit | overrides


def fake_results(tmp_path, fits, model=None, name="train_step.json"):
    path = tmp_path / name
    payload = {"model": model or asdict(ARGS), "fits": fits, "environment": {"device": "FAKE H100", "commit": "abc", "date": "2026-01-01"},
               "records": [{"key": "k", "status": "oom: simulated", "extra": {"name": "triton-full-eager-L4"}}]}  # fmt: skip
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def uniform_lengths(tmp_path):
    """Every sample 16,384 tokens: each is one micro-batch of its own, so the layout is countable by hand."""
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"lengths": {"all": [L]}}))
    return path


def test_the_arithmetic_by_hand(tmp_path, uniform_lengths):
    """817 samples, 32 per step, 8 ranks: 25 steps of 4 passes (4 samples per rank) and a last step
    of 17 samples, 3 passes (3, 2, 2, ... samples per rank); 15 epochs of 103 passes."""
    total, _ = _counts()
    section = project.load_results(fake_results(tmp_path, [fake_fit()]))
    p = project.project(section, pool=project.length_dist.load(uniform_lengths))
    passes = 15 * (25 * 4 + 3)
    per_pass = 64 * 0.100 + 0.050  # every pass is one bench step's sample: 64 layers at 100 ms, the head at 50 ms
    comm = 8 * total * 7 / 8 / 450e9
    optimizer = 2.0e-3 * total / 1e9 / 8
    assert (p.steps, p.passes_per_rank, p.tokens_per_epoch) == (390, passes, 817 * L)
    assert p.compute_s == pytest.approx(passes * per_pass, rel=1e-9)
    assert p.comm_per_pass_s == pytest.approx(comm, rel=1e-12)
    assert p.optimizer_per_step_s == pytest.approx(optimizer, rel=1e-12)
    assert p.minutes_overlapped * 60 == pytest.approx(passes * max(per_pass, comm) + 390 * optimizer, rel=1e-9)
    assert p.minutes_not_overlapped * 60 == pytest.approx(passes * (per_pass + comm) + 390 * optimizer, rel=1e-9)
    assert p.fits_memory and p.memory_gib < p.memory_capacity_gib
    assert p.r_layer_tflops == pytest.approx(fake_fit()["layer_flops"] / 0.1 / 1e12)


def test_the_command_prints_the_arithmetic(tmp_path, uniform_lengths, capsys):
    path = fake_results(tmp_path, [fake_fit()])
    assert project.main(["--results", str(path), "--lengths", str(uniform_lengths)]) == 0
    out = capsys.readouterr().out
    assert "projected from FAKE H100 (commit abc, 2026-01-01)" in out
    assert "= 390; 1545 micro-batch passes per rank" in out and "x 1545 passes" in out
    assert "13.39 M tokens per epoch" in out and "ANCHORS.md's ~4 M tokens per epoch" in out and "goal (<= 60 min" in out
    assert project.main(["--results", str(path), "--lengths", str(uniform_lengths), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["proxy"]["passes_per_rank"] == 1545 and payload["anchors_tokens"]["tokens_per_epoch"] == pytest.approx(4e6, rel=0.01)


def test_the_fastest_fit_that_fits_in_memory_is_chosen(tmp_path):
    slow, fast = fake_fit(), fake_fit(group="triton-full-compile", compile=True, per_layer_ms=80.0)
    no_ac = fake_fit(group="triton-none-eager", ac="none", per_layer_ms=60.0)  # fastest, but the plan does not fit 80 GB
    section = project.load_results(fake_results(tmp_path, [slow, fast, no_ac]))
    assert project.choose_fit(section)["group"] == "triton-full-compile"
    assert project.choose_fit(section, "triton-full-eager")["group"] == "triton-full-eager"
    with pytest.raises(project.MissingMeasurements, match="no fit named 'x'"):
        project.choose_fit(section, "x")


@pytest.mark.parametrize(
    "fits, model, message",
    [
        ([], None, r"no per-layer fit: .* \(config statuses: \{'triton-full-eager-L4': 'oom: simulated'\}"),
        ([fake_fit(rest_ms=-3.0)], None, r"fit 'triton-full-eager' has a non-positive time .* too noisy"),
        ([fake_fit()], {**asdict(ARGS), "hidden_size": 48}, r"other shapes .* not Qwen2.5-32B's"),
        ([{"group": "g"}], None, r"fit 'g' lacks \['ac', 'compile'"),
    ],
)
def test_what_is_missing_is_said(tmp_path, capsys, fits, model, message):
    path = fake_results(tmp_path, fits, model)
    assert project.main(["--results", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_no_results_file_says_how_to_get_one(tmp_path, capsys):
    assert project.main(["--results", str(tmp_path / "summary-H100.json")]) == 2
    err = capsys.readouterr().err
    assert "summary-H100.json does not exist" in err and "bash benchmarks/gpu_suite.sh train" in err


def test_scale_out_arithmetic_from_a_simulated_step():
    """Bytes per pass from the simulation, ring factors, max(compute, links) per pass when overlapped."""
    from benchmarks.scale_out import scale_row

    gb = 1e9
    sim = {"peak_gib": 50.0, "planned_total_gib": 60.0, "micro_batches": [16384, 16384],
           "collectives": {"all_gather": 200 * gb, "reduce_scatter": 200 * gb, "all_reduce": 40 * gb}}  # fmt: skip
    one = scale_row(1, 500e12, nvlink_gbps=400.0, ib_gbps=50.0, simulation=sim)
    two = scale_row(2, 500e12, nvlink_gbps=400.0, ib_gbps=50.0, simulation=sim)
    assert one.gather_scatter_gb_per_pass == pytest.approx(200) and one.all_reduce_gb_per_pass == pytest.approx(20)
    assert one.nvlink_s_per_pass == pytest.approx(200 * 7 / 8 / 400) and one.ib_s_per_pass == 0.0  # no link across nodes
    assert two.ib_s_per_pass == pytest.approx(20 * 2 * (2 - 1) / 2 / 50)
    assert one.minutes_serial > one.minutes_overlapped > 0 and two.gpus == 16
    assert two.compute_s_per_pass <= one.compute_s_per_pass  # twice the GPUs: no pass gets slower
    slow = scale_row(1, 500e12, nvlink_gbps=1.0, ib_gbps=50.0, simulation=sim)
    assert not slow.hidden and slow.minutes_overlapped == pytest.approx(slow.nvlink_s_per_pass * slow.passes_per_step * 390 / 60, rel=1e-6)


def test_context_parallel_halves_each_passes_compute_and_adds_its_kv_collectives(tmp_path):
    """The 32k recipe at cp=2 on 8 ranks: the passes of 4 data-parallel groups, each rank at half a
    pass's compute, plus per pass the K/V all-gathers (forward and recompute) and reduce-scatter."""
    from limo.engine.context import cp_bytes_per_pass

    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"lengths": {"all": [32768]}}))
    section = project.load_results(fake_results(tmp_path, [fake_fit()]))
    pool = project.length_dist.load(path)
    cp2 = project.project(section, project.Recipe(cp=2, tokens_per_microbatch=32768), pool=pool)
    passes = 15 * (25 * 8 + 5)  # 4 data-parallel groups: 8 samples each per full step, 5 of the last step's 17 on the first
    fit = fake_fit()
    r_layer, r_head = fit["layer_flops"] / 0.100, fit["head_flops"] / 0.050
    whole = 64 * project.layer_flops(project.TARGET, [32768]) / r_layer + project.head_flops(project.TARGET, 32768) / r_head
    assert cp2.passes_per_rank == passes and cp2.compute_s == pytest.approx(passes * whole / 2, rel=1e-9)
    per_pass = cp_bytes_per_pass(project.TARGET, 32768, 2)
    assert per_pass == 64 * 3 * 32768 * 2 * 8 * 128 * 2 // 2  # 64 layers x 3 collectives x 32k tokens' K/V (bf16) x 1/2
    assert cp2.cp_comm_s == pytest.approx(cp2.passes_per_rank * per_pass / 450e9, rel=1e-12)
    assert cp2.cp_hidden  # 24 GiB per pass over NVLink: ~57 ms against seconds of compute
