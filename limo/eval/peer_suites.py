r"""How often does our grader agree with other graders' own test suites?

`python -m limo.eval.peer_suites [--dir tests/graders] [--show]` reads every `*.jsonl` there: cases
adapted from other projects' answer-equivalence tests (Math-Verify's numina, open-thoughts and
whole-output suites, NeMo-Skills' tests/test_math_equal.py), one JSON object per line with its
`source` (repository, path, commit, test and index), `gold`, `pred`, `expected` and `kind`. It
prints our agreement per file and per kind, lists every disagreement, and exits non-zero on an
accepted wrong answer or on a disagreement that `conventions.json` in the same folder does not
explain (each entry: the case's source, our verdict, and why we differ on purpose).

How a case is graded here:
- `bare` cases (NeMo-Skills) are two answers: `is_equivalent(pred, gold)`, and with `symmetric`
  the other way round too; both must give the expected verdict.
- Other cases are a model's text and a gold as the suite writes it (`$28\%$`, `$$\boxed{2},
  \boxed{3}$$`). A gold's boxes, if any, are its answer, else the gold without its math
  delimiters. A prediction with `\boxed` is graded as every output is (`grade`: the last box and
  the boxes listed with it). One without a box has no answer under LIMO's protocol; the suites
  test equivalence on such texts, so here its last math span (`$...$`, `\(...\)`, `\[...\]`), or
  the whole text when it has none, stands for the answer: those cases measure the comparison,
  not the extraction.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from limo.eval.grading import extract_answer, grade, is_equivalent, listed_with

ROOT = Path(__file__).resolve().parents[2]
GOAL = 0.97  # issue 26: at least 97% agreement, and no accepted wrong answer

# Display math may span lines; inline math may not (`Answer $ \n 9 \n $` holds no formula: Math-Verify's rule).
_BROKEN_SPAN_RE = re.compile(r"(?:\$|\\\()[ \t]*\n")
_MATH_SPAN_RE = re.compile(r"\$\$([\s\S]+?)\$\$|\$([^$\n]+?)\$|\\\(([^\n]+?)\\\)|\\\[([\s\S]+?)\\\]")


@dataclass(frozen=True)
class Case:
    file: str
    source: str
    gold: str
    pred: str | None
    expected: bool
    kind: str
    bare: bool = False
    symmetric: bool = False


def load_cases(folder: Path) -> list[Case]:
    cases = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                missing = {"source", "gold", "pred", "expected", "kind"} - set(r)
                if missing:
                    raise KeyError(f"{path}:{lineno}: missing {sorted(missing)}")
                cases.append(Case(path.name, r["source"], r["gold"], r["pred"], bool(r["expected"]), r["kind"],
                                  bool(r.get("bare")), bool(r.get("symmetric"))))  # fmt: skip
    return cases


def suite_gold(gold: str) -> str:
    """A suite's gold as an answer: its boxes (a gold may be a whole solution), else its last
    math span, else the text itself."""
    return extract_answer(gold) or math_answer(gold) or gold


def math_answer(text: str) -> str | None:
    """The answer of a text without a box: its last math span with the spans listed before it
    (`$1$ and $2$`), or the text itself when it holds no math delimiter at all; None when it
    holds delimiters but no span (`Answer $ \\n 9 \\n $`)."""
    spans = [(m.start(), m.end(), next(g for g in m.groups() if g is not None).strip()) for m in _MATH_SPAN_RE.finditer(text)]
    spans = [s for s in spans if s[2]]
    if not spans:
        return None if _BROKEN_SPAN_RE.search(text) else text.strip()  # `$1,000.99`: a dollar sign, not a formula
    listed = [spans[-1][2]]
    for (_, end, content), (start, _, _) in zip(spans[-2::-1], spans[::-1]):
        if not listed_with(text, end, start):
            break
        listed.append(content)
    return ", ".join(reversed(listed))


def verdict(case: Case) -> bool | None:
    """Our verdict on a case (None: the pred is missing, which every grader calls wrong: False)."""
    if case.pred is None:
        return False
    if case.bare:
        ours = is_equivalent(case.pred, case.gold)
        if case.symmetric and is_equivalent(case.gold, case.pred) != ours:
            return not case.expected  # the two orders disagree: that is a miss whichever is right
        return ours
    gold = suite_gold(case.gold)
    if "\\boxed" in case.pred or "\\fbox" in case.pred:
        return grade(case.pred, [gold])[1]
    return is_equivalent(math_answer(case.pred), gold)


def load_conventions(folder: Path) -> dict[str, dict]:
    path = folder / "conventions.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["cases"]
    for i, e in enumerate(entries):
        if missing := {"source", "ours", "reason"} - set(e):
            raise KeyError(f"{path}: entry {i} lacks {sorted(missing)}")
    return {e["source"]: e for e in entries}


LATEX_SUITE = "Math-Verify test_all, no box"


def suite_of(case: Case) -> str:
    """The suite a case counts in. Math-Verify's test_all cases whose prediction has no box test
    its extraction of un-boxed LaTeX, which LIMO's protocol does not do: reported, not in the goal."""
    if case.file.startswith("nemo"):
        return "NeMo-Skills test_math_equal"
    for name, suite in (("test_numina_cases.py", "Math-Verify numina"), ("test_open_thoughts.py", "Math-Verify open-thoughts")):
        if name in case.source:
            return suite
    boxed = case.pred is not None and ("\\boxed" in case.pred or "\\fbox" in case.pred)
    return "Math-Verify test_all, boxed" if boxed else LATEX_SUITE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.eval.peer_suites", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=ROOT / "tests/graders", help="the folder of adapted suites (default tests/graders)")
    p.add_argument("--show", action="store_true", help="print every disagreement, the explained ones too")
    args = p.parse_args(argv)
    cases = load_cases(args.dir)
    conventions = load_conventions(args.dir)
    per: dict[str, list[int]] = {}
    false_accepts, unexplained = [], []
    start = time.perf_counter()
    for case in cases:
        ours = verdict(case)
        agree = ours == case.expected
        for group in (suite_of(case), f"  kind {case.kind}"):
            stats = per.setdefault(group, [0, 0])
            stats[0] += 1
            stats[1] += agree
        if agree:
            continue
        explained = conventions.get(case.source)
        if ours and not case.expected:
            false_accepts.append(case)
        elif explained is None or explained["ours"] != ours:
            unexplained.append(case)
            explained = None
        if args.show or explained is None:
            tag = "FALSE ACCEPT" if ours and not case.expected else "explained" if explained else "OPEN"
            print(f"[{tag}] {case.source}: gold={case.gold[:120]!r} pred={case.pred[:160]!r} ours={ours}"
                  + (f" -- {explained['reason']}" if explained else ""))  # fmt: skip
    elapsed = time.perf_counter() - start
    print(f"\n{'suite / kind':<40} {'n':>5} {'agree':>8}")
    for group, (n, a) in sorted(per.items(), key=lambda kv: (kv[0].startswith(" "), kv[0])):
        print(f"{group:<40} {n:>5} {a / n:>8.2%}")
    goal = [v for k, v in per.items() if not k.startswith(" ") and k != LATEX_SUITE]
    n, agree = sum(v[0] for v in goal), sum(v[1] for v in goal)
    print(f"{'all but ' + LATEX_SUITE:<40} {n:>5} {agree / n:>8.2%}  (goal >= {GOAL:.0%})")
    print(f"\naccepted wrong answers: {len(false_accepts)} of {sum(not c.expected for c in cases)} wrong; disagreements explained "
          f"by conventions.json: {sum(v[0] - v[1] for k, v in per.items() if not k.startswith(' ')) - len(false_accepts) - len(unexplained)}; "
          f"unexplained: {len(unexplained)}; {len(cases)} cases in {elapsed:.1f} s")  # fmt: skip
    return 1 if false_accepts or unexplained or agree / n < GOAL else 0


if __name__ == "__main__":
    sys.exit(main())
