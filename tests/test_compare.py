"""benchmarks/compare.py: every rule fires when its figure moves, and only then."""

import json

import pytest

from benchmarks.compare import compare_figures, compare_records, main

BASE = {"figures": {
    "syncs": {"value": 1, "rule": "max", "tolerance": 0.0},
    "ratio": {"value": 0.5, "rule": "equal", "tolerance": 1e-6},
    "mfu": {"value": 0.4, "rule": "min", "tolerance": 0.05},
}}


def test_unchanged_figures_pass():
    assert compare_figures({"figures": {"syncs": 1, "ratio": 0.5, "mfu": 0.4}}, BASE) == ([], [])


@pytest.mark.parametrize("figures, moved", [
    ({"syncs": 2, "ratio": 0.5, "mfu": 0.4}, "syncs: 2"),
    ({"syncs": 1, "ratio": 0.5001, "mfu": 0.4}, "ratio: 0.5001"),
    ({"syncs": 1, "ratio": 0.5, "mfu": 0.37}, "mfu: 0.37"),
    ({"ratio": 0.5, "mfu": 0.4}, "syncs: missing"),
])
def test_a_moved_figure_is_named(figures, moved):
    regressions, _ = compare_figures({"figures": figures}, BASE)
    assert len(regressions) == 1 and regressions[0].startswith(moved)


def test_improvements_pass_with_a_note():
    regressions, notes = compare_figures({"figures": {"syncs": 0, "ratio": 0.5, "mfu": 0.5, "new": 3.0}}, BASE)
    assert regressions == []
    assert any("syncs" in n and "better" in n for n in notes) and any("new: not in the baseline" in n for n in notes)


def _scaled(run: dict, factor: dict) -> dict:
    return {**run, "records": [{**r, "median_ms": r["median_ms"] * factor.get(r["key"], 1.0)} for r in run["records"]]}


def test_timing_records_as_the_harness_writes_them(tmp_path):
    """A real benchmark JSON (the RMSNorm smoke sweep on CPU) against itself, slowed down, and from another device."""
    from benchmarks import bench_rmsnorm

    out = tmp_path / "run.json"
    assert bench_rmsnorm.main(["--sweep", "smoke", "--providers", "eager", "--modes", "fwd", "--device", "cpu",
                               "--warmup-ms", "1", "--rep-ms", "2", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    keys = [r["key"] for r in run["records"]]
    assert len(keys) == 2 and all(r["median_ms"] > 0 for r in run["records"])

    assert compare_records(run, run, tolerance=0.10) == ([], [])
    slower = _scaled(run, {keys[1]: 1.25})
    regressions, _ = compare_records(slower, run, tolerance=0.10)
    assert regressions == [f"{keys[1]}: {slower['records'][1]['median_ms']:.4g} ms, baseline {run['records'][1]['median_ms']:.4g} ms (+25%)"]
    faster = _scaled(run, {keys[0]: 0.5})
    regressions, notes = compare_records(faster, run, tolerance=0.10)
    assert regressions == [] and notes == [f"{keys[0]}: {faster['records'][0]['median_ms']:.4g} ms, 50% faster than the baseline; update it"]

    failed = {**run, "records": [{**run["records"][0], "median_ms": None, "status": "unavailable: no liger"}, run["records"][1]]}
    regressions, notes = compare_records(failed, run, tolerance=0.10)
    assert regressions == [] and notes == [f"{keys[0]}: unavailable: no liger"]
    regressions, _ = compare_records({**run, "records": run["records"][1:]}, run, tolerance=0.10)
    assert regressions == [f"{keys[0]}: in the baseline, missing from the results"]

    with pytest.raises(ValueError, match="timings compare only on the same device"):
        compare_records({**run, "environment": {**run["environment"], "device": "NVIDIA H200"}}, run, 0.1)
    with pytest.raises(ValueError, match="the baseline has no environment.device"):
        compare_records(run, {"records": run["records"]}, 0.1)

    (tmp_path / "slow.json").write_text(json.dumps(slower))
    assert main([str(tmp_path / "slow.json"), str(out)]) == 1
    assert main([str(tmp_path / "slow.json"), str(out), "--tolerance", "0.3"]) == 0
