"""curate: the shared normalisation, dedup and decontamination on planted cases."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from limo.curate.decontaminate import _QUESTION_KEYS, remove_contaminated
from limo.curate.dedup import remove_duplicates
from limo.curate.text import canonical, tokens
from tests.conftest import shared_path


def _env(uid: str, question: str) -> dict:
    return {"uid": uid, "source": "pool.jsonl", "question": question, "chain": "", "answer": "1", "record": {"id": uid}}


@pytest.mark.parametrize("variant", [
    "Find $x$ if $2x + 3 = 7$.",
    "  Find   $x$ if\n$2x+3=7$.  ",             # whitespace
    r"Find \(x\) if \(2x + 3 = 7\).",             # \( \) for $ $
    "Problem 7. Find $x$ if $2x + 3 = 7$.",       # a label in front
    "Determine $x$ if $2x + 3 = 7$.",             # another opening verb
    "Find $x$ if $2x + 3.00 = 7$.",               # number formatting
])
def test_canonical_reads_rewritten_copies_as_the_original(variant):
    assert canonical(variant) == canonical("Find $x$ if $2x + 3 = 7$.") == "ask x if 2 x + 3 = 7 ."


def test_tokens_and_number_formats():
    assert tokens(r"Compute $1{,}000 \cdot \dfrac{1}{2}$") == ["ask", "1000", r"\cdot", r"\frac", "{", "1", "}", "{", "2", "}"]
    assert canonical("The 3rd of 1,234,567 is 2.50") == "the 3 rd of 1234567 is 2.5"


LONG = ("Let $ABC$ be a triangle with $AB = 13$, $BC = 14$ and $CA = 15$. The incircle of the triangle touches "
        "$BC$ at $D$. Find the length of the segment $AD$, and express it in simplest radical form.")


def test_dedup_keeps_the_first_of_each_cluster():
    pool = [_env("a", LONG),
            _env("b", "Compute 12 + 7."),
            _env("c", "  " + LONG.replace(" ", "\n", 3).replace("$", "$ ") + " "),     # exact after normalisation
            _env("d", LONG.replace("simplest radical form", "simplest radical form please")),  # near: one word added
            _env("e", "Compute 12 + 8."),                                             # other numbers: another problem
            _env("f", "Problem 3. Compute 12 + 7.")]
    kept, gone, stats = remove_duplicates(pool)
    assert [e["uid"] for e in kept] == ["a", "b", "e"]
    assert {e["uid"]: (e["reason"], e["duplicate_of"]) for e in gone} == {
        "c": ("duplicate", "a"), "d": ("duplicate", "a"), "f": ("duplicate", "b")}
    assert stats["exact_duplicates"] == 2 and stats["near_duplicate_links"] == 1
    assert all(e["record"] == {"id": e["uid"]} for e in kept + gone)


def test_dedup_threshold_is_checked():
    with pytest.raises(ValueError, match="dup-threshold"):
        remove_duplicates([], 0.0)


# ------------------------------------------------------------------------------------------
# Decontamination, measured on planted cases: every evaluation problem of five benchmarks hidden
# in a pool, rewritten one of five ways, beside the other five benchmarks' problems as the clean
# part (real competition problems, so a fair test of false alarms); then the folds swapped.

FOLDS = (("aime", "amc", "math", "gaokao", "gpqa"), ("olympiadbench", "cn_math_2024", "kaoyan", "grade_school_math", "minerva"))
_VERBS = {"Find": "Determine", "Compute": "Calculate", "Determine": "Find", "Calculate": "Compute", "What": "Which",
          "Let": "Suppose", "Given": "Suppose", "If": "Suppose"}


def _rewrite(text: str, how: str, rng: random.Random) -> str:
    if how == "whitespace":
        return re.sub(" ", lambda _: rng.choice([" ", "  ", "\n", " \t "]), text)
    if how == "delimiters":
        return re.sub(r"\$([^$]+)\$", r"\\(\1\\)", text)
    if how == "label":
        return f"Problem {rng.randint(1, 30)}. {text}"
    if how == "verb":
        first, _, rest = text.partition(" ")
        return f"{_VERBS.get(first, 'Now, ' + first[:1].lower() + first[1:])} {rest}"
    for step in ("verb", "delimiters", "label", "whitespace"):
        text = _rewrite(text, step, rng)
    return text


def _problems(folder: Path) -> list[str]:
    out = []
    with open(folder / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            out.append(next(record[k] for k in _QUESTION_KEYS if isinstance(record.get(k), str) and record[k].strip()))
    return out


def test_planted_contamination_is_caught_and_named(tmp_path):
    suites = shared_path("data", "eval")
    rng = random.Random(0)
    planted = caught = named = clean = false_alarms = 0
    for hidden, other in (FOLDS, FOLDS[::-1]):
        eval_dir = tmp_path / hidden[0]
        for name in hidden:
            (eval_dir / name).mkdir(parents=True)
            shutil.copy(suites / name / "test.jsonl", eval_dir / name / "test.jsonl")
        pool = []
        for name in hidden:
            for i, text in enumerate(_problems(suites / name)):
                how = ("whitespace", "delimiters", "label", "verb", "all")[i % 5]
                pool.append({**_env(f"{name}:{i}", _rewrite(text, how, rng)), "planted": name})
        for name in other:
            pool += [{**_env(f"clean-{name}:{i}", text), "planted": None} for i, text in enumerate(_problems(suites / name))]
        kept, gone, stats = remove_contaminated(pool, eval_dir)
        planted += sum(e["planted"] is not None for e in pool)
        caught += sum(e["planted"] is not None for e in gone)
        named += sum(e["planted"] == e["benchmark"] for e in gone)
        clean += sum(e["planted"] is None for e in pool)
        false_alarms += sum(e["planted"] is None for e in gone)
        for e in gone:
            assert e["reason"] == "contaminated" and e["match"]["id"] and ("overlap" in e or "similarity" in e)
    assert planted == 2233 and clean == 2233
    assert caught / planted >= 0.98, f"caught {caught} of {planted}"
    assert false_alarms / clean <= 0.02, f"{false_alarms} of {clean} clean problems called contaminated"
    assert named / caught >= 0.95, f"right benchmark for {named} of {caught}"


def test_a_short_problem_with_other_numbers_is_not_contaminated(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test.jsonl").write_text(json.dumps({"id": "t1", "problem": "Compute $17 \\cdot 23$."}) + "\n")
    pool = [_env("same", "Calculate \\(17 \\cdot 23\\)."), _env("other", "Compute $17 \\cdot 29$.")]
    kept, gone, _ = remove_contaminated(pool, tmp_path)
    assert [e["uid"] for e in kept] == ["other"]
    assert gone[0]["benchmark"] == "toy" and gone[0]["match"]["id"] == "t1" and gone[0]["similarity"] == 1.0
