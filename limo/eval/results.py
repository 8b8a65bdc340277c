"""Per-sample results on disk (JSONL, append-only, resumable) and their summary (pass@1 with its
spread over samples, pass@k).

One line per (problem, sample). A run that dies mid-write leaves at most a torn last line; it is
cut off on the next load, and everything before it counts as done.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from limo.eval.grading import pass_at_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleResult:
    benchmark: str
    problem_id: str
    sample: int
    seed: int
    golds: list[str]
    output: str
    finish_reason: str
    num_tokens: int
    extracted: str | None
    correct: bool


_FIELDS = set(SampleResult.__dataclass_fields__)


def load_results(path: Path) -> dict[tuple[str, int], SampleResult]:
    """(problem_id, sample) -> result. A torn last line is truncated away; any other bad line is
    an error naming file and line."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines[-1]:  # no newline at the end: the last write was cut short
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(lines[-1]))
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(lines[-1]))
    results: dict[tuple[str, int], SampleResult] = {}
    for lineno, line in enumerate(lines[:-1], 1):
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
        if set(fields) != _FIELDS:
            raise ValueError(f"{path}:{lineno}: expected keys {sorted(_FIELDS)}, got {sorted(fields)}")
        result = SampleResult(**fields)
        key = (result.problem_id, result.sample)
        if key in results:
            raise ValueError(f"{path}:{lineno}: problem {key[0]!r} sample {key[1]} appears twice")
        results[key] = result
    return results


def append_results(path: Path, results: Iterable[SampleResult]) -> None:
    """Append and fsync, so a crash after this returns loses nothing already generated."""
    data = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in results)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ResultWriter:
    """Appends results one at a time as they finish, from any thread. Each line reaches the OS at
    once (a Ctrl-C, a SIGTERM or a SIGKILL of the process loses none written), and the file is
    fsynced at most every `fsync_s` seconds and on close (a power cut loses at most that span)."""

    def __init__(self, path: Path, fsync_s: float = 5.0):
        self.path, self.fsync_s = path, fsync_s
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._synced = time.monotonic()

    def write(self, result: SampleResult) -> None:
        line = json.dumps(asdict(result), ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if time.monotonic() - self._synced >= self.fsync_s:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rewrite_results(path: Path, results: Iterable[SampleResult]) -> None:
    """Replace the file's contents atomically (write a sibling, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    append_results(tmp, results)
    os.replace(tmp, path)


def _ks(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    return ks + ([n] if n not in ks else [])


def summarize(name: str, samples: int, problem_ids: list[str], results: dict[tuple[str, int], SampleResult]) -> dict:
    """pass@1 (mean of per-problem accuracy), its spread over sample indices (each index is one
    full run over the benchmark: std and range of those runs' accuracies), unbiased pass@k."""
    missing = [(p, j) for p in problem_ids for j in range(samples) if (p, j) not in results]
    if missing:
        raise ValueError(f"{name}: {len(missing)} samples have no result yet, e.g. {missing[:3]}")
    rows = [[results[(p, j)] for j in range(samples)] for p in problem_ids]
    correct = [sum(r.correct for r in row) for row in rows]
    runs = [100.0 * sum(row[j].correct for row in rows) / len(rows) for j in range(samples)]
    flat = [r for row in rows for r in row]
    return {
        "benchmark": name,
        "problems": len(rows),
        "samples": samples,
        "pass@1": 100.0 * sum(c / samples for c in correct) / len(rows),
        "pass@1_std": statistics.stdev(runs) if samples > 1 else 0.0,
        "pass@1_min": min(runs),
        "pass@1_max": max(runs),
        "pass@k": {str(k): 100.0 * sum(pass_at_k(samples, c, k) for c in correct) / len(rows) for k in _ks(samples)},
        "no_answer_%": 100.0 * sum(r.extracted is None for r in flat) / len(flat),
        "truncated_%": 100.0 * sum(r.finish_reason == "length" for r in flat) / len(flat),
        "mean_tokens": sum(r.num_tokens for r in flat) / len(flat),
    }


def format_table(summaries: list[dict]) -> str:
    """The summary as a fixed-width table: pass@1 mean ± std [min, max] over samples, pass@k."""
    header = f"{'benchmark':<14} {'problems':>8} {'samples':>7} {'pass@1':>7} {'± std':>6} {'[min, max]':>14} " \
             f"{'pass@k':<28} {'no box':>7} {'cut':>6} {'tokens':>8}"
    lines = [header, "-" * len(header)]
    for s in summaries:
        ks = " ".join(f"@{k}:{v:.1f}" for k, v in s["pass@k"].items() if k != "1") or "-"
        lines.append(f"{s['benchmark']:<14} {s['problems']:>8} {s['samples']:>7} {s['pass@1']:>7.2f} {s['pass@1_std']:>6.2f} "
                     f"{'[' + format(s['pass@1_min'], '.1f') + ', ' + format(s['pass@1_max'], '.1f') + ']':>14} "
                     f"{ks:<28} {s['no_answer_%']:>6.1f}% {s['truncated_%']:>5.1f}% {s['mean_tokens']:>8.0f}")
    return "\n".join(lines)
