"""Step 3, difficulty: K samples per problem from a model, graded; keep the pass rates in a band.

LIMO's filter: drop what a capable model already solves, keep what strong models solve only
rarely. Each problem gets K samples (LIMO's system prompt and the model's chat template, seeded
per problem and sample, so a resumed run draws the very samples an uninterrupted one would),
graded against the record's answer by eval.grading; its pass rate is correct / K. A pass rate
inside `band` = [lo, hi] (edges included) is kept; above is "too_easy", below "too_hard".

Samples are appended to samples.jsonl (limo/eval/results.py's format) one batch at a time and fsynced,
so a killed run loses at most the batch in flight and the rerun starts where it stopped. The
sampling settings are kept beside them: samples drawn another way are never mixed in.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from limo.curate.records import mark_removed
from limo.eval.generators import Completion, Request
from limo.eval.grading import extract_answer, grade
from limo.eval.results import SampleResult, append_results, load_results
from limo.eval.run import LIMO_SYSTEM_PROMPT, sample_seed
from limo.tools.errors import UserError
from limo.tools.progress import progress_bar

BENCHMARK = "curate"


def parse_band(text: str) -> tuple[float, float]:
    """"LO,HI" -> (lo, hi) with 0 <= lo <= hi <= 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--band must be LO,HI (two pass rates), got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise UserError(f"--band needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def _check_settings(path: Path, settings: dict) -> None:
    """Samples on disk must come from the same model and sampling settings."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise UserError(f"{path}: the samples beside it were drawn with other settings ({', '.join(changed)}); "
                             f"use another --out, or delete {path.parent} to draw them again")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def _crash_point() -> int | None:
    """CURATE_CRASH_AFTER_BATCHES=N: SIGKILL this process after N batches (the resume test's fault)."""
    value = os.environ.get("CURATE_CRASH_AFTER_BATCHES")
    return int(value) if value else None


def draw_and_grade(pool: list[dict], generate: Callable[[Sequence[Request]], list[Completion]], folder: Path, *,
                   samples: int, temperature: float, max_tokens: int, seed: int, batch_size: int, settings: dict,
                   grade_threads: int = os.cpu_count() or 2) -> dict[tuple[str, int], SampleResult]:
    """Every (problem, sample) graded, resuming from folder/samples.jsonl; returns them all."""
    if samples < 1 or batch_size < 1 or max_tokens < 1:
        raise UserError(f"--samples, --batch-size and --max-tokens must be >= 1, got {samples}, {batch_size}, {max_tokens}")
    _check_settings(folder / "samples.json", settings)
    path = folder / "samples.jsonl"
    done = load_results(path)
    todo = [(e, j) for e in pool for j in range(samples) if (e["uid"], j) not in done]
    verdicts: dict[tuple[str | None, str], bool] = {}  # K samples repeat answers: grade each once

    def grade_once(e: dict, completion: Completion) -> tuple[str | None, bool]:
        pred = extract_answer(completion.text)
        key = (pred, e["answer"] or "")
        if key not in verdicts:
            verdicts[key] = grade(completion.text, [e["answer"]] if e["answer"] else [])[1]
        return pred, verdicts[key]

    crash_after = _crash_point()
    bar = progress_bar(len(pool) * samples, "difficulty", "sample", initial=len(pool) * samples - len(todo))
    with ThreadPoolExecutor(grade_threads) as graders:
        for batch, start in enumerate(range(0, len(todo), batch_size), 1):
            chunk = todo[start:start + batch_size]
            seeds = [sample_seed(seed, BENCHMARK, e["uid"], j) for e, j in chunk]
            requests = [Request(LIMO_SYSTEM_PROMPT, e["question"], temperature, 1.0, max_tokens, s) for (e, _), s in zip(chunk, seeds)]
            completions = generate(requests)
            graded = list(graders.map(lambda ec: grade_once(*ec), [(e, c) for (e, _), c in zip(chunk, completions)]))
            new = [SampleResult(BENCHMARK, e["uid"], j, s, [e["answer"]] if e["answer"] else [], c.text, c.finish_reason,
                                c.num_tokens, pred, ok) for (e, j), s, c, (pred, ok) in zip(chunk, seeds, completions, graded)]
            append_results(path, new)
            done.update({(r.problem_id, r.sample): r for r in new})
            bar.update(len(chunk))
            if crash_after is not None and batch >= crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return done


def filter_by_band(pool: list[dict], results: dict[tuple[str, int], SampleResult], samples: int,
                   band: tuple[float, float]) -> tuple[list[dict], list[dict], dict]:
    """(kept, removed, stats) from the graded samples."""
    lo, hi = band
    kept, gone = [], []
    for e in pool:
        correct = sum(results[(e["uid"], j)].correct for j in range(samples))
        rate = correct / samples
        row = {**e, "pass_rate": rate}
        if rate > hi:
            gone.append(mark_removed(row, "too_easy"))
        elif rate < lo:
            gone.append(mark_removed(row, "too_hard"))
        else:
            kept.append(row)
    stats = {"records": len(pool), "samples": samples, "band": [lo, hi], "kept": len(kept),
             "too_easy": sum(e["reason"] == "too_easy" for e in gone), "too_hard": sum(e["reason"] == "too_hard" for e in gone),
             "mean_pass_rate": sum(e["pass_rate"] for e in kept + gone) / max(1, len(pool))}
    return kept, gone, stats
