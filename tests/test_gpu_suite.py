"""benchmarks/gpu_suite.sh quick, the prepared run for a lent GPU, smoke-tested here: the same
steps on the smoke sweeps (QUICK_ON_CPU=1), down to the stage JSON and the partial summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_quick_stage_runs_every_step_and_writes_a_partial_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the scripts choose the interpreter themselves
    env.update(QUICK_ON_CPU="1", QUICK_SWEEP="smoke", QUICK_TESTS="tests/test_layers.py", PYTHON=sys.executable, OUT=str(tmp_path),
               QUICK_TRAIN_CONFIGS="triton-full-eager-L1,triton-full-eager-L2")  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    failed = [line.split("(log: ")[-1].rstrip(")") for line in done.stdout.splitlines() if ": FAILED: " in line]
    logs = "".join(f"\n--- {log}\n" + Path(log).read_text()[-2000:] for log in failed if Path(log).exists())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    assert not failed, done.stdout
    for stage in ("rmsnorm-full", "cross_entropy", "train_step", "sampler"):
        result = json.loads((tmp_path / "quick" / f"{stage}-cpu.json").read_text())
        assert result["sweep"] == "smoke" and result["records"], stage
        ours = [r for r in result["records"] if r["provider"] in ("ours", "triton")]
        assert ours and all(r["status"] == "ok" for r in ours), (stage, [r["status"] for r in ours])
    assert "passed" in (tmp_path / "quick" / "tests-cpu.log").read_text()
    summary = json.loads((tmp_path / "summary-cpu.json").read_text())
    assert summary["partial"] is True and summary["command"] == "bash benchmarks/gpu_suite.sh quick"
    assert summary["ceilings"]["copy_gbps"] > 0 and summary["ceilings"]["matmul_tflops"] > 0
    assert summary["rmsnorm_bw_fraction"] > 0  # what a CPU can measure; the rest says why it is missing
    assert all(summary[k] is not None or k in summary["missing"] for k in ("flce_mem_ratio_vs_liger", "train_mfu_32b_layers",
                                                                           "sampler_roofline_fraction", "memory_plan_rel_error"))
    last = done.stdout.strip().splitlines()
    assert last[-1] == f"wrote {tmp_path / 'summary-cpu.json'}" and any(line.startswith("ceilings") for line in last[-14:])


def test_the_quick_sweeps_are_the_issues_shapes():
    from benchmarks import bench_cross_entropy, bench_rmsnorm, bench_sampler, bench_train_step
    from limo.model.qwen2 import PRESETS

    assert bench_rmsnorm.SWEEPS["quick"] == [dict(rows=16384, width=5120, dtype="bf16", residual=False)]
    assert bench_cross_entropy.SWEEPS["quick"] == [dict(tokens=8192, hidden=5120, vocab=152064, dtype="bf16")]
    train = bench_train_step.SWEEPS["quick"]
    assert train.args == PRESETS["qwen2.5-32b"] and train.tokens == 16384 and [c.layers for c in train.configs] == [2, 4]
    sampler = bench_sampler.SWEEPS["quick"]
    assert sampler.args == PRESETS["qwen2.5-7b"] and sampler.batches == (1, 64, 256)
