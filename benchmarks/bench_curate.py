"""Curation at scale, on a CPU: the cost of `dedup,decontaminate` by pool size, and the grader's speed.

    python -m benchmarks.bench_curate [--sizes 5000,10000,20000] [--out FILE]
    python -m benchmarks.bench_curate --grading        # verdicts per second on ../shared/data/graded_outputs

The pool is made here, seeded, so that anyone gets the same one: half the demo's synthetic
problems, 40% problems of the LIMO evaluation suites with every number redrawn (real text and
lengths, mostly not contaminated), 10% relabelled copies of demo problems ("Problem 7." and new
whitespace, which dedup must catch). Each size runs `python -m limo.curate --steps dedup,decontaminate`
in a process of its own, timed on the wall clock, with its peak resident set. Goal: 20,000 records
in at most 2 minutes on 2 cores. The cost is linear in the pool (a normalisation, a MinHash and
an LSH query per record, a few n-gram lookups, plus a fixed cost to index the suites), so the
table's last two rows give the projection to 1 M records.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import ROOT, environment, python_unit

GOAL_20K_S = 120.0
UNIT_RUNS = 25  # python_unit timings on each side of the grading
SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"
_NUMBER = re.compile(r"\d+")


def speed_pool(size: int, eval_dir: Path = SHARED_EVAL, seed: int = 0) -> list[dict]:
    """`size` records: 50% synthetic problems, 40% suite problems with redrawn numbers, 10% relabelled copies."""
    from limo.curate.decontaminate import load_suites
    from limo.data.synthetic import problems

    rng = random.Random(seed)
    fresh, suites, copies = size // 2, 2 * size // 5, size - size // 2 - 2 * size // 5
    pool = [{"id": f"demo-{i}", **p} for i, p in enumerate(problems(fresh, seed=seed))]
    items = load_suites(eval_dir)
    for i in range(suites):
        item = items[i % len(items)]
        question = _NUMBER.sub(lambda m: str(rng.randrange(2, 10 ** len(m.group()) + 7)), item.text)
        pool.append({"id": f"{item.benchmark}-{i}", "question": question, "solution": "See the text. \\boxed{1}", "answer": "1"})
    for i in range(copies):
        original = pool[i]
        pool.append({**original, "id": f"copy-{i}", "question": f"Problem {i % 50 + 1}.  " + original["question"].replace(" ", "  ", 2)})
    rng.shuffle(pool)
    return pool


def time_curation(size: int, eval_dir: Path = SHARED_EVAL) -> dict:
    """Wall seconds, each step's seconds and the peak RSS of `python -m limo.curate --steps dedup,decontaminate` on a pool of `size`."""
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        pool.write_text("".join(json.dumps(r) + "\n" for r in speed_pool(size, eval_dir)))
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "limo.curate", "--pool", str(pool), "--out", str(out), "--steps", "dedup,decontaminate",
               "--eval-dir", str(eval_dir)]  # fmt: skip
        log = Path(tmp) / "curate.log"
        with open(log, "w") as stderr:  # a file, not a pipe: nobody reads while os.wait4 waits
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, which Popen.wait does not give
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        steps = {step: json.loads((out / "steps" / step / "done.json").read_text()) for step in ("dedup", "decontaminate")}
    return {"records": size, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "removed": {step: done.get("stats", {}).get("removed") for step, done in steps.items()}}  # fmt: skip


def grading_speed(shared: Path = ROOT.parent / "shared", threads: int = os.cpu_count() or 2) -> dict:
    """Verdicts per second of eval.grading.grade over every real output of `shared`/data/graded_outputs,
    workers warm, and the wall time per verdict in units of harness.python_unit (timed on the wall
    clock just before and after grading): a slower or busier machine moves both alike."""
    from limo.eval.agreement import grade_timed, load_graded_outputs

    records = load_graded_outputs(shared)
    units = [python_unit(time.perf_counter) for _ in range(UNIT_RUNS)]
    _, elapsed = grade_timed(records, threads)
    units += [python_unit(time.perf_counter) for _ in range(UNIT_RUNS)]
    unit = statistics.median(units)
    return {"verdicts": len(records), "seconds": elapsed, "verdicts_per_s": len(records) / elapsed, "threads": threads,
            "python_unit_us": unit * 1e6, "units_per_verdict": elapsed / len(records) / unit}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_curate", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5000,10000,20000", help="pool sizes to time (default 5000,10000,20000)")
    p.add_argument("--eval-dir", type=Path, default=SHARED_EVAL, help="the suites to decontaminate against (default ../shared/data/eval)")
    p.add_argument("--grading", action="store_true", help="time the grader on the real graded outputs instead")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.grading:
        rows = [grading_speed()]
        print(f"graded {rows[0]['verdicts']} outputs in {rows[0]['seconds']:.2f} s: {rows[0]['verdicts_per_s']:.0f} verdicts/s "
              f"on {rows[0]['threads']} threads ({rows[0]['units_per_verdict']:.2f} python units per verdict)")  # fmt: skip
    else:
        rows = [time_curation(int(n), args.eval_dir) for n in args.sizes.split(",")]
        for r in rows:
            goal = f"  (goal <= {GOAL_20K_S:.0f} s)" if r["records"] == 20_000 else ""
            print(f"{r['records']:>9,} records: {r['wall_s']:6.1f} s wall, {r['peak_rss_mb']:6.0f} MB peak; removed {r['removed']}{goal}")
        if len(rows) >= 2:
            (a, b) = rows[-2], rows[-1]
            per_record = (b["wall_s"] - a["wall_s"]) / (b["records"] - a["records"])
            fixed = a["wall_s"] - per_record * a["records"]
            print(f"linear fit of the last two: {1000 * per_record:.2f} s per 1,000 records + {fixed:.1f} s fixed; "
                  f"1 M records: ~{(fixed + per_record * 1e6) / 60:.0f} min")
    if args.out:
        args.out.write_text(json.dumps({"bench": "curate", "environment": environment(torch.device("cpu")), "rows": rows}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
