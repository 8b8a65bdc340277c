"""How often does our grader agree with the Qwen2.5-Math harness on real model outputs?

`python -m limo.eval.agreement [--shared ../shared] [--adjudicated tests/adjudicated.json] [--show]
[--verdicts FILE]` grades every output in ../shared/data/graded_outputs (see its PROVENANCE.md)
with extract_answer + is_equivalent against the benchmark's own gold, and prints agreement with the
harness's verdicts per file and overall, and the grading speed (verdicts per second, the worker
processes started before the clock). Disagreements are checked against the hand-adjudicated
cases: each says who was right and why; an unadjudicated disagreement is listed and makes the
command exit non-zero. `--verdicts` writes one JSON line per output (file, idx, extracted
answer, verdict): diff two of them to see what a grader change moved.

Golds: MATH500 and AIME records carry the dataset's answer; OlympiadBench records only carry the
harness's own normalised copy (which lost letters: `m n-\\lfloor m/2\\rfloor` became
`n-\\lfloor/2\\rfloor`), so its gold is looked up by question in ../shared/data/eval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from limo.eval.grading import grade, is_equivalent

ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = "data/graded_outputs/skythought_qwen25math_harness"
TOOLS_DIR = "data/graded_outputs/skythought_tools"


@dataclass(frozen=True)
class GradedOutput:
    """One output with the harness's verdict. `file` is relative to data/graded_outputs."""

    file: str
    idx: int
    output: str
    gold: str | float
    harness: bool


def _olympiad_golds(shared: Path) -> dict[str, str]:
    path = shared / "data/eval/olympiadbench/test.jsonl"
    golds = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            golds[record["question"].strip()] = record["answer"]
    return golds


def _harness_records(path: Path, rel: str, olympiad: dict[str, str]) -> list[GradedOutput]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            r = json.loads(line)
            if "answer" in r:
                gold = r["answer"]
            elif r["question"].strip() in olympiad:
                gold = olympiad[r["question"].strip()]
            else:
                raise KeyError(f"{path}:{lineno}: no `answer` and the question is not in olympiadbench/test.jsonl")
            out.append(GradedOutput(rel, int(r["idx"]), r["code"][0], gold, bool(r["score"][0])))
    return out


def _tools_records(path: Path, rel: str) -> list[GradedOutput]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [GradedOutput(rel, i, v["responses"]["0.0"]["content"], v["answer"], bool(v["responses"]["0.0"]["correctness"]))
            for i, v in enumerate(data.values())]


def load_graded_outputs(shared: Path) -> list[GradedOutput]:
    """Every graded output under shared/data/graded_outputs, in a fixed order."""
    base = shared / "data/graded_outputs"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is missing: the shared data folder must sit beside the project as ../shared")
    olympiad = _olympiad_golds(shared)
    records: list[GradedOutput] = []
    for path in sorted((shared / HARNESS_DIR).glob("*/*.jsonl")):
        records += _harness_records(path, str(path.relative_to(base)), olympiad)
    for path in sorted((shared / TOOLS_DIR).glob("*.json")):
        records += _tools_records(path, str(path.relative_to(base)))
    return records


def grade_record(record: GradedOutput) -> tuple[str | None, bool]:
    return grade(record.output, [record.gold])


def grade_timed(records: list[GradedOutput], threads: int) -> tuple[list[tuple[str | None, bool]], float]:
    """Every record's (extracted answer, verdict), graded on `threads` threads, and the seconds it
    took; the symbolic workers are started first, off the clock."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: is_equivalent("x^2", "x x"), range(2 * threads)))
        start = time.perf_counter()
        results = list(pool.map(grade_record, records))
        return results, time.perf_counter() - start


def load_adjudicated(path: Path) -> dict[tuple[str, int], dict]:
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    table = {}
    for i, case in enumerate(cases):
        missing = {"file", "idx", "verdict", "reason"} - set(case)
        if missing:
            raise KeyError(f"{path}: case {i} lacks {sorted(missing)}")
        table[(case["file"], int(case["idx"]))] = case
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.eval.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared folder (default ../shared)")
    p.add_argument("--adjudicated", type=Path, default=ROOT / "tests/adjudicated.json", help="hand-adjudicated cases")
    p.add_argument("--show", action="store_true", help="print every disagreement with its answers")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="grading threads; symbolic checks share one worker process per CPU (default: the CPU count)")
    p.add_argument("--verdicts", type=Path, help="write each output's (file, idx, extracted answer, verdict) here, as JSON lines")
    args = p.parse_args(argv)

    records = load_graded_outputs(args.shared)
    adjudicated = load_adjudicated(args.adjudicated) if args.adjudicated.exists() else {}
    results, elapsed = grade_timed(records, args.threads)
    if args.verdicts:
        with open(args.verdicts, "w", encoding="utf-8") as f:
            f.writelines(json.dumps([r.file, r.idx, pred, ok]) + "\n" for r, (pred, ok) in zip(records, results))

    per_file: dict[str, list[int]] = {}
    harness_wrong: dict[str, int] = {}
    ours_wrong = 0
    open_cases = []
    for record, (pred, ours) in zip(records, results):
        stats = per_file.setdefault(record.file, [0, 0, 0, 0])  # n, agree, ours right, harness right
        stats[0] += 1
        stats[1] += ours == record.harness
        stats[2] += ours
        stats[3] += record.harness
        if ours == record.harness:
            continue
        case = adjudicated.get((record.file, record.idx))
        if case is None:
            open_cases.append((record, pred, ours))
        elif case["verdict"] == ours:
            harness_wrong[case.get("category", "other")] = harness_wrong.get(case.get("category", "other"), 0) + 1
        else:
            ours_wrong += 1
        if args.show or case is None:
            print(f"[{'OPEN' if case is None else 'adjudicated'}] {record.file} idx={record.idx} gold={record.gold!r} "
                  f"pred={pred!r} ours={ours} harness={record.harness}" + (f" -- {case['reason']}" if case else ""))

    print(f"\n{'file':<86} {'n':>5} {'agree':>7} {'ours':>6} {'harness':>8}")
    total = [0, 0]
    for file, (n, agree, ours_right, harness_right) in per_file.items():
        total[0] += n
        total[1] += agree
        print(f"{file:<86} {n:>5} {agree / n:>7.2%} {ours_right:>6} {harness_right:>8}")
    print(f"{'overall':<86} {total[0]:>5} {total[1] / total[0]:>7.2%}")
    wrong = ", ".join(f"{k} {v}" for k, v in sorted(harness_wrong.items())) or "0"
    print(f"\ndisagreements: {total[0] - total[1]}; adjudicated: harness wrong {sum(harness_wrong.values())} ({wrong}), "
          f"ours wrong {ours_wrong}; not adjudicated: {len(open_cases)}")
    print(f"graded {len(records)} outputs in {elapsed:.2f} s: {len(records) / elapsed:.0f} verdicts/s on {args.threads} threads")
    no_box = harness_wrong.get("no_box", 0)
    print(f"agreement leaving out outputs without \\boxed (a protocol difference, not a grading one): "
          f"{total[1] / (total[0] - no_box):.2%} of {total[0] - no_box}")
    return 1 if open_cases else 0


if __name__ == "__main__":
    sys.exit(main())
