"""limo/data/lengths.py: the committed long-CoT lengths are what the script derives from ../shared."""

import json

import pytest

from limo.data import lengths
from tests.conftest import shared_path


def test_the_committed_lengths_are_a_derivation_from_shared():
    """The first records of each source, re-tokenized now, equal the committed counts."""
    shared_path("data", "graded_outputs", "skythought_qwen25math_harness")
    shared_path("data", "tokenizers", "qwen2.5")
    fresh = lengths.derive(limit=3)
    committed = json.loads(lengths.DATA_FILE.read_text())
    assert fresh == {name: committed["lengths"][name][:3] for name in lengths.SOURCES}


def test_the_committed_file_describes_itself():
    payload = json.loads(lengths.DATA_FILE.read_text())
    every = lengths.load()
    assert payload["count"] == len(every) == sum(payload["sources"].values()) == 570
    assert payload["max"] == max(every) and payload["over_16384"] == sum(n > 16384 for n in every)
    assert payload["mean_capped_16384"] == pytest.approx(sum(min(n, 16384) for n in every) / len(every), abs=0.05)


def test_draws_are_seeded_scaled_and_capped():
    pool = [10, 1000, 40000]
    a = lengths.draw(50, seed=3, lengths=pool)
    assert a == lengths.draw(50, seed=3, lengths=pool) and a != lengths.draw(50, seed=4, lengths=pool)
    assert set(a) == {10, 1000, 16384}
    assert set(lengths.draw(50, seed=3, cap=256, scale=256 / 16384, lengths=pool)) == {2, 16, 256}


def test_a_malformed_file_is_named(tmp_path):
    bad = tmp_path / "lengths.json"
    bad.write_text(json.dumps({"lengths": {"x": [3, 0]}}))
    with pytest.raises(ValueError, match=rf"{bad}: lengths must be positive integers \(bad: \[0\]"):
        lengths.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a length distribution"):
        lengths.load(bad)
