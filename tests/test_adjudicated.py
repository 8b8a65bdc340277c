"""Our grader on ~2,800 real model outputs, against the graders that scored them.

../shared/data/graded_outputs holds outputs with the Qwen2.5-Math harness's verdicts (and a
SkyThought grader's). Every verdict of ours must equal theirs, except on the cases in
tests/adjudicated.json, where a person read the output and decided; there ours must equal the
adjudicated verdict. `python -m limo.eval.agreement` prints the same comparison as a table.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from limo.eval.agreement import GradedOutput, grade_record, load_graded_outputs
from tests.conftest import shared_path

ADJUDICATED = json.loads((Path(__file__).parent / "adjudicated.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def outputs() -> dict[tuple[str, int], GradedOutput]:
    shared = shared_path("data", "graded_outputs").parents[1]
    return {(r.file, r.idx): r for r in load_graded_outputs(shared)}


def test_adjudicated_file_is_well_formed():
    keys = [(c["file"], c["idx"]) for c in ADJUDICATED]
    assert len(keys) == len(set(keys)), "a case is adjudicated twice"
    for case in ADJUDICATED:
        assert isinstance(case["verdict"], bool) and isinstance(case["idx"], int), case
        assert case["category"] in {"no_box", "harness_error"}, case
        assert len(case["reason"]) > 20, case


@pytest.mark.parametrize("case", ADJUDICATED, ids=lambda c: f"{Path(c['file']).parent.name or 'tools'}/{Path(c['file']).stem[:24]}:{c['idx']}")
def test_adjudicated_case(case, outputs):
    record = outputs[(case["file"], case["idx"])]
    assert record.harness != case["verdict"], "an adjudicated case must be one where the harness was wrong"
    pred, verdict = grade_record(record)
    assert verdict == case["verdict"], f"pred={pred!r} gold={record.gold!r}: {case['reason']}"
    if case["category"] == "no_box":
        assert pred is None and "boxed" not in record.output


def test_every_other_output_agrees_with_the_harness(outputs):
    adjudicated = {(c["file"], c["idx"]): c["verdict"] for c in ADJUDICATED}
    records = list(outputs.values())
    assert len(records) == 2845
    with ThreadPoolExecutor(4) as pool:
        verdicts = [v for _, v in pool.map(grade_record, records)]
    wrong = [(r.file, r.idx, r.gold, v) for r, v in zip(records, verdicts)
             if v != adjudicated.get((r.file, r.idx), r.harness)]
    assert not wrong, f"{len(wrong)} new disagreements (adjudicate them in tests/adjudicated.json): {wrong[:10]}"
