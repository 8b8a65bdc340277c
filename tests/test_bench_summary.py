"""benchmarks/summary.py on fake stage JSON: each headline computed as documented, a missing or
partial stage gives null and says why, and the train section feeds the projection."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import project, summary
from tests.test_project import fake_fit, fake_results

DEV = "FAKE-H100"


def _env(commit="abc"):
    return {"device": "FAKE H100", "commit": commit, "date": "2026-01-02T00:00:00+00:00"}


def _rec(provider, mode, case, status="ok", **fields):
    return {"bench": "b", "case": case, "mode": mode, "provider": provider, "status": status, "median_ms": None,
            "fraction_of_ceiling": None, "peak_extra_bytes": None, "extra": {}, **fields}  # fmt: skip


def write_stages(folder, sweep="full"):
    rms = [_rec("ours", "fwd", {"rows": i}, fraction_of_ceiling=f) for i, f in enumerate((0.9, 0.8, 0.95))]
    rms += [_rec("ours", "fwd+bwd", {"rows": 0}, fraction_of_ceiling=0.7), _rec("eager", "fwd", {"rows": 0}, fraction_of_ceiling=0.5)]
    ce = []
    for t, (ours_ms, liger_ms, ours_mem, liger_mem) in {4096: (10.0, 20.0, 100, 400), 8192: (30.0, 15.0, 200, 200)}.items():
        case = {"tokens": t}
        ce += [_rec("ours", "fwd+bwd", case, median_ms=ours_ms, peak_extra_bytes=ours_mem),
               _rec("liger", "fwd+bwd", case, median_ms=liger_ms, peak_extra_bytes=liger_mem),
               _rec("liger-fp32", "fwd+bwd", case, median_ms=2 * ours_ms, peak_extra_bytes=2 * ours_mem),
               _rec("ours", "fwd", case, median_ms=1.0, peak_extra_bytes=1)]  # fmt: skip
    ce.append(_rec("liger", "fwd+bwd", {"tokens": 16384}, status="error: boom"))
    sampler = []
    for batch, frac, vs in ((1, 0.2, 3.0), (64, 0.75, 12.0), (256, 0.72, 15.0)):
        extra = {"tokens_per_s": 100.0 * batch, "vs_transformers": vs}
        sampler.append(_rec("ours", "decode", {"batch": batch}, fraction_of_ceiling=frac, extra=extra))
    train_records = [
        _rec("triton", "step", {"layers": 2}, extra={"name": "triton-full-eager-L2", "plan_rel_error": 0.04}),
        _rec("triton", "step", {"layers": 4}, extra={"name": "triton-full-eager-L4", "plan_rel_error": -0.07}),
        _rec("triton", "step", {"layers": 4}, status="oom: x", extra={"name": "triton-none-eager-L4"}),
        _rec("torch", "step", {"layers": 4}, extra={"name": "torch-full-eager-L4", "plan_rel_error": -0.5}),  # not what the planner models
    ]
    stages = {
        "rmsnorm-full": {"records": rms, "ceilings": {"copy_gbps": 3000.0}},
        "cross_entropy": {"records": ce},
        "sampler": {"records": sampler, "greedy_agreement": {"tokens_compared": 64, "identical_prefix": 9}},
    }
    for name, payload in stages.items():
        (folder / f"{name}-{DEV}.json").write_text(json.dumps({"sweep": sweep, "environment": _env(), "command": f"cmd {name}", **payload}))
    train = json.loads(fake_results(folder, [fake_fit()], name="tmp.json").read_text()) | {"sweep": sweep, "records": train_records}
    (folder / f"train_step-{DEV}.json").write_text(json.dumps(train | {"environment": _env("def")}))
    (folder / "tmp.json").unlink()


def test_headlines_from_fake_stages(tmp_path):
    write_stages(tmp_path)
    s = summary.build(tmp_path, DEV)
    assert s["rmsnorm_bw_fraction"] == pytest.approx(0.9)
    assert s["flce_time_ratio_vs_liger"] == pytest.approx(math.sqrt(0.5 * 2.0))
    assert s["flce_mem_ratio_vs_liger"] == pytest.approx(math.sqrt(0.25 * 1.0))
    for name in ("flce_time_ratio_vs_liger", "flce_mem_ratio_vs_liger"):
        equal = s["details"][name]["vs_liger_fp32"]
        assert equal["geomean"] == pytest.approx(0.5) and list(equal["per_case"].values()) == [0.5, 0.5]
    assert s["train_mfu_32b_layers"] == 0.5
    assert s["sampler_roofline_fraction"] == 0.72
    assert s["memory_plan_rel_error"] == -0.07
    assert s["missing"] == {}
    assert s["device"] == "FAKE H100" and s["commit"] == ["abc", "def"] and s["date"] == "2026-01-02T00:00:00+00:00"
    assert s["command"] == "bash benchmarks/gpu_suite.sh rmsnorm ce train sampler"
    assert s["details"]["sampler_roofline_fraction"]["min_vs_transformers_at_large_batch"] == 12.0
    assert s["goals"] == {
        "train_mfu_32b_layers >= 0.5": True,
        "limo projection <= 60 min within 80 GB, no offload": s["details"]["limo_projection"]["proxy_tokens"]["minutes_overlapped"] <= 60,
        "sampler decode >= 70% of the roofline at batch >= 64": True,
        "sampler >= 10x transformers at batch >= 64": True,
        "memory planner within 10% of the measured peak": True,
    }
    # the summary carries what the projection needs: it projects the same from either file
    from_summary = project.project(project.load_results(_write(tmp_path / "s.json", s)))
    from_train = project.project(project.load_results(tmp_path / f"train_step-{DEV}.json"))
    assert from_summary.minutes_overlapped == from_train.minutes_overlapped > 0


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return path


def test_missing_and_partial_stages_give_null_and_say_why(tmp_path):
    write_stages(tmp_path)
    (tmp_path / f"sampler-{DEV}.json").unlink()
    smoke = json.loads((tmp_path / f"rmsnorm-full-{DEV}.json").read_text()) | {"sweep": "smoke"}
    _write(tmp_path / f"rmsnorm-full-{DEV}.json", smoke)
    s = summary.build(tmp_path, DEV)
    assert s["sampler_roofline_fraction"] is None and "bash benchmarks/gpu_suite.sh sampler" in s["missing"]["sampler_roofline_fraction"]
    assert s["rmsnorm_bw_fraction"] is None
    assert "(sweep 'smoke'): the headlines come from the full sweeps only" in s["missing"]["rmsnorm_bw_fraction"]
    assert s["goals"]["sampler decode >= 70% of the roofline at batch >= 64"] is None
    assert s["flce_time_ratio_vs_liger"] is not None and "sampler" not in s["command"]


def test_liger_unavailable_is_said(tmp_path):
    write_stages(tmp_path)
    ce = json.loads((tmp_path / f"cross_entropy-{DEV}.json").read_text())
    for r in ce["records"]:
        if r["provider"] == "liger":
            r["status"] = "unavailable: liger-kernel is not installed"
    _write(tmp_path / f"cross_entropy-{DEV}.json", ce)
    s = summary.build(tmp_path, DEV)
    assert s["flce_time_ratio_vs_liger"] is None and s["flce_mem_ratio_vs_liger"] is None
    assert "liger: ['unavailable: liger-kernel is not installed']" in s["missing"]["flce_time_ratio_vs_liger"]


def test_the_command_writes_the_summary(tmp_path, capsys):
    write_stages(tmp_path)
    assert summary.main(["--dir", str(tmp_path), "--device", DEV]) == 0
    written = json.loads((tmp_path / f"summary-{DEV}.json").read_text())
    assert all(k in written for k in summary.HEADLINES + ("device", "commit", "command", "date"))
    out = capsys.readouterr().out
    assert "rmsnorm_bw_fraction          0.9000" in out and "goal train_mfu_32b_layers >= 0.5: met" in out


def _suite(stage, env_extra):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), stage], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_suite_script_on_a_machine_without_a_gpu(tmp_path):
    """The script's own plumbing: a bad stage, a GPU stage refused here, and the summary stage (which needs no
    GPU) writing summary-<device>.json and the projection under RESULTS and returning both in OUT."""
    bad = _suite("bogus", {})
    assert bad.returncode == 2 and "unknown stage bogus" in bad.stderr
    if not torch.cuda.is_available():
        refused = _suite("rmsnorm", {"OUT": str(tmp_path / "out0")})
        assert refused.returncode == 1 and "no CUDA device here" in refused.stderr
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    write_stages(results)
    done = _suite("summary", {"DEVICE": DEV, "RESULTS": str(results), "OUT": str(out)})
    assert done.returncode == 0, done.stderr
    for folder in (results, out):
        written = json.loads((folder / f"summary-{DEV}.json").read_text())
        assert written["rmsnorm_bw_fraction"] == pytest.approx(0.9)
        projection = (folder / f"projection-{DEV}.txt").read_text()
        assert projection.startswith("LIMO recipe on one 8 x H100 node") and done.stdout.endswith(projection)
