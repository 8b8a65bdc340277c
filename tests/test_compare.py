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


def test_timing_records_of_one_device(tmp_path):
    base = {"device": "H100", "records": [{"key": "a", "ms": 1.0}, {"key": "b", "ms": 2.0}]}
    run = {"device": "H100", "records": [{"key": "a", "ms": 1.05}, {"key": "b", "ms": 2.5}, {"key": "c", "ms": None, "status": "unavailable: no liger"}]}
    regressions, notes = compare_records(run, base, tolerance=0.10)
    assert regressions == ["b: 2.5 ms, baseline 2 ms (+25%)"]
    assert any("unavailable" in n for n in notes)
    with pytest.raises(ValueError, match="timings compare only on the same device"):
        compare_records({**run, "device": "H200"}, base, 0.1)
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "base.json").write_text(json.dumps(base))
    assert main([str(tmp_path / "run.json"), str(tmp_path / "base.json")]) == 1
    assert main([str(tmp_path / "run.json"), str(tmp_path / "base.json"), "--tolerance", "0.3"]) == 0
