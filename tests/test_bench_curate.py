"""benchmarks/bench_curate.py: the seeded pool the curation speed figures come from, and its timing run."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_curate
from tests.conftest import shared_path


def test_the_speed_pool_is_seeded_and_has_its_stated_parts():
    eval_dir = shared_path("data", "eval")
    pool = bench_curate.speed_pool(1000, eval_dir)
    assert pool == bench_curate.speed_pool(1000, eval_dir) and len(pool) == 1000
    kinds = [r["id"].split("-")[0] for r in pool]
    assert kinds.count("demo") == 500 and kinds.count("copy") == 100
    suites = {p.parent.name for p in eval_dir.glob("*/test.jsonl")}
    assert sum(kind in suites for kind in kinds) == 400
    originals = {r["id"]: r["question"] for r in pool}
    copy = next(r for r in pool if r["id"] == "copy-0")
    assert copy["question"] != originals["demo-0"] and copy["question"].startswith("Problem 1.")


def test_curation_is_timed_in_a_process_of_its_own_and_dedup_finds_the_copies(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert bench_curate.main(["--sizes", "300,600", "--eval-dir", str(shared_path("data", "eval")), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["records"] for r in rows] == [300, 600]
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["removed"]["dedup"] >= r["records"] // 10  # every relabelled copy, at least
    assert "1 M records" in capsys.readouterr().out


def test_grading_speed_is_held_in_python_units(monkeypatch):
    from limo.eval import agreement

    records = agreement.load_graded_outputs(shared_path())[:40]
    monkeypatch.setattr(agreement, "load_graded_outputs", lambda shared: records)
    r = bench_curate.grading_speed(threads=2)
    assert r["verdicts"] == 40 and r["threads"] == 2 and r["python_unit_us"] > 0
    assert r["verdicts_per_s"] == 40 / r["seconds"]
    assert r["units_per_verdict"] == pytest.approx(r["seconds"] / 40 / (r["python_unit_us"] * 1e-6), rel=1e-12)
