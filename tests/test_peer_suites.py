"""Other graders' public suites (tests/graders/*.jsonl, each case with its source), run through
our grader by limo.eval.peer_suites: issue 26's goal of >= 97% agreement outside Math-Verify's
un-boxed extraction cases, no accepted wrong answer anywhere, and every disagreement explained."""

from __future__ import annotations

import json
import re

from limo.eval import peer_suites
from limo.eval.peer_suites import LATEX_SUITE, load_cases, load_conventions, math_answer, suite_gold, suite_of, verdict
from tests.conftest import ROOT

GRADERS = ROOT / "tests/graders"
SOURCE_RE = re.compile(r"^[\w.-]+/[\w.-]+ tests/[\w/]+\.py@[0-9a-f]{10} test_\w+ #\d+$")


def test_every_case_names_its_source_and_the_suites_hold_what_the_issue_lists():
    cases = load_cases(GRADERS)
    assert all(SOURCE_RE.match(c.source) for c in cases), [c.source for c in cases if not SOURCE_RE.match(c.source)][:3]
    assert len({c.source for c in cases}) == len(cases)
    suites = {suite_of(c) for c in cases}
    assert {"Math-Verify numina", "Math-Verify open-thoughts", "Math-Verify test_all, boxed", "NeMo-Skills test_math_equal"} <= suites
    assert sum(not c.expected for c in cases) >= 40  # wrong answers the grader must refuse, not only right ones


def test_agreement_goal_no_accepted_wrong_answer_and_every_difference_explained(capsys):
    assert peer_suites.main([]) == 0, capsys.readouterr().out[-3000:]
    out = capsys.readouterr().out
    goal = re.search(r"all but .* (\d+\.\d+)%", out)
    assert goal and float(goal.group(1)) >= 97.0
    assert "accepted wrong answers: 0 of" in out and "unexplained: 0" in out


def test_conventions_name_only_real_disagreements():
    cases = {c.source: c for c in load_cases(GRADERS)}
    conventions = load_conventions(GRADERS)
    for source, entry in conventions.items():
        case = cases[source]  # a stale entry (a case renamed or gone) fails here
        assert verdict(case) == entry["ours"] != case.expected, source  # a fixed case must leave the list
        assert not entry["ours"], source  # what we differ on purpose is only ever a refusal
        assert suite_of(case) == LATEX_SUITE or entry["category"] in ("abs", "final", "braces", "matrix_op"), source
    data = json.loads((GRADERS / "conventions.json").read_text())
    assert all(len(e["reason"]) > 40 for e in data["cases"])


def test_the_adapter_reads_golds_and_unboxed_texts_as_the_suites_mean_them():
    assert suite_gold(r"$$\boxed{2}, \boxed{3}$$") == "2, 3"
    assert suite_gold(r"$28\%$") == r"28\%"
    assert suite_gold("1000.99") == "1000.99"
    assert math_answer(r"$1$ and $2$ and $3$") == "1, 2, 3"
    assert math_answer(r"first $x=3$. So the answer is $5$") == "5"  # a sentence between two formulas lists nothing
    assert math_answer("Answer $ \n 9 \n $") is None  # inline math does not cross lines
    assert math_answer("$1,000.99") == "$1,000.99"  # a dollar sign, not a formula
