"""The benchmark scripts run: --help, and a tiny sweep writing JSON (on CPU: Triton's interpreter; on a GPU: CUDA)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_cross_entropy, bench_rmsnorm
from tests.conftest import ROOT

BENCHES = {"bench_rmsnorm": bench_rmsnorm, "bench_cross_entropy": bench_cross_entropy}


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_help_names_the_sweeps_and_providers(name, capsys):
    module = BENCHES[name]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(sweep in out for sweep in module.SWEEPS) and all(p in out for p in module.PROVIDERS)


def test_scripts_run_as_modules():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in sorted(BENCHES):
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "--sweep" in done.stdout, done.stderr


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_smoke_sweep_writes_one_record_per_case_mode_provider(name, tmp_path, capsys):
    module = BENCHES[name]
    out = tmp_path / "result.json"
    args = ["--sweep", "smoke", "--providers", "ours,eager", "--warmup-ms", "1", "--rep-ms", "1", "--out", str(out)]
    assert module.main(args) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    assert result["schema"] == 1 and result["sweep"] == "smoke" and result["environment"]["torch"]
    assert result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    assert len(records) == len(module.SWEEPS["smoke"]) * len(module.MODES) * 2
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["fraction_of_ceiling"] > 0, r
    assert "ours" in capsys.readouterr().out  # the table was printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: on a GPU the sweeps time CUDA kernels")
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_the_readmes_smoke_command_runs_on_a_cpu_without_setting_the_interpreter(name, tmp_path):
    """`python -m benchmarks.bench_rmsnorm --sweep smoke`, as the README writes it (short timings
    aside): the scripts pick Triton's interpreter themselves, say so in one line, and exit 0, with
    a comparator that cannot run here recorded as unavailable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--sweep", "smoke", "--warmup-ms", "1", "--rep-ms", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "our Triton kernels run in Triton's CPU interpreter" in done.stderr
    records = json.loads(out.read_text())["records"]
    assert {r["provider"] for r in records} >= {"ours", "eager", "liger"}
    assert all(r["status"] == "ok" for r in records if r["provider"] == "ours")
    assert all(r["status"] == "ok" or r["status"].startswith("unavailable: ") for r in records), [r["status"] for r in records]


def test_unknown_provider_is_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        bench_rmsnorm.main(["--sweep", "smoke", "--providers", "ours,mine"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("error: ") and re.search(r"unknown providers \['mine'\]", err), err


def test_a_comparator_that_cannot_run_here_is_unavailable_not_our_failure(tmp_path):
    """Liger's RMSNorm kernels fail in Triton's CPU interpreter: that is Liger not running here
    (exit 0, recorded "unavailable"); the same failure in our own provider is an error."""
    import torch
    from triton.runtime.errors import InterpreterError

    from benchmarks.harness import Work, run_sweep

    out = tmp_path / "result.json"
    args = ["--sweep", "smoke", "--providers", "ours,liger", "--warmup-ms", "1", "--rep-ms", "1", "--out", str(out)]
    assert bench_rmsnorm.main(args) == 0
    statuses = {r["provider"]: r["status"] for r in json.loads(out.read_text())["records"]}
    assert statuses["ours"] == "ok"
    if not torch.cuda.is_available():
        assert statuses["liger"].startswith("unavailable: its Triton kernels fail in Triton's CPU interpreter"), statuses

    def broken(case, mode, device):
        raise InterpreterError("AttributeError('float' object has no attribute 'to')")

    records = run_sweep("x", [{"n": 1}], ["fwd"], {"ours": broken, "theirs": broken}, lambda c, m: Work(bytes=1),
                        torch.device("cpu"), {"copy_gbps": 1.0, "matmul_tflops": 1.0}, log=lambda _: None)
    assert records[0].status.startswith("error: InterpreterError") and records[1].status.startswith("unavailable")
