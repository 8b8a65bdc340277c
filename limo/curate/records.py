"""The records curation passes between steps, and the files each step reads and writes.

A pool record travels in an envelope: `{"uid", "source", "question", "chain", "answer", "record",
...what the steps learned}`. `record` is the line as it was read, untouched, so what comes out the
other end is the record itself; `uid` ("file:line") names it in every step's files. The question,
chain and answer are read once from any layout limo/data/sources.py reads (LIMO, messages, alpaca).

A step's folder holds kept.jsonl and removed.jsonl (envelopes; a removal carries `reason`) and,
written last, done.json: its settings and a hash of its input. A folder with a done.json that
matches is finished; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from limo.data.sources import iter_records
from limo.tools.errors import UserError

REASONS = ("duplicate", "contaminated", "too_easy", "too_hard", "wrong_answer", "not_selected")


def _answer(record: dict, sample_answer: str | None, chain: str) -> str | None:
    """The record's answer field (any layout may carry one), else the chain's last \\boxed{}."""
    from limo.eval.grading import extract_answer

    value = record.get("answer", sample_answer)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return extract_answer(chain)


def read_pool(paths: Iterable[str]) -> list[dict]:
    """Every record of every pool file, in order, as an envelope."""
    pool = []
    for path in paths:
        for file, _, record, sample in iter_records(path):
            question = next(m["content"] for m in sample.messages if m["role"] == "user")
            chain = sample.messages[-1]["content"]
            pool.append({"uid": sample.where, "source": str(record.get("source") or Path(file).name), "question": question,
                         "chain": chain, "answer": _answer(record, sample.answer, chain), "record": record})
    uids = [e["uid"] for e in pool]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise UserError(f"pool record {dup} is given twice: name each pool file once")
    return pool


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Written aside and renamed into place: a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class StepDir:
    """One step's folder under DIR/steps/."""

    def __init__(self, out: Path, name: str):
        self.path = out / "steps" / name
        self.kept, self.removed, self.done = self.path / "kept.jsonl", self.path / "removed.jsonl", self.path / "done.json"

    def stamp(self) -> dict:
        """What the output on disk was made from: {"input": hash, "settings": {...}}."""
        return json.loads(self.done.read_text(encoding="utf-8"))["stamp"]

    def finished(self, stamp: dict) -> bool:
        return self.done.exists() and self.stamp() == stamp

    def write(self, kept: list[dict], gone: list[dict], stamp: dict, stats: dict[str, Any]) -> None:
        bad = [e["uid"] for e in gone if e.get("reason") not in REASONS]
        if bad:
            raise UserError(f"{self.path}: removals without a known reason ({', '.join(REASONS)}): {bad[:3]}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.done.unlink(missing_ok=True)
        write_jsonl(self.kept, kept)
        write_jsonl(self.removed, gone)
        tmp = self.done.with_name("done.json.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "stats": stats}, indent=1), encoding="utf-8")
        os.replace(tmp, self.done)

    def stats(self) -> dict:
        return json.loads(self.done.read_text(encoding="utf-8"))["stats"]


def mark_removed(envelope: dict, reason: str, **details: Any) -> dict:
    """The envelope marked removed, with why."""
    return {**envelope, "reason": reason, **details}


_LAYOUT_KEYS = ("messages", "instruction", "input", "output")


def as_limo(envelope: dict) -> dict:
    """A kept record in LIMO's layout, which limo/engine/train.py reads: a LIMO record exactly as it
    came; one in the messages or alpaca layout with those fields turned into question, solution
    and answer, and every other field of its own (id, source, ...) unchanged."""
    record = envelope["record"]
    if "question" in record and "solution" in record:
        return dict(record)
    row = {k: v for k, v in record.items() if k not in _LAYOUT_KEYS}
    return row | {"question": envelope["question"], "solution": envelope["chain"], "answer": envelope["answer"] or ""}


def as_removal(envelope: dict) -> dict:
    """A removal as downstream tools read it (DIR/removed.jsonl): the record's own fields, untouched,
    plus its `reason`, the `benchmark` it was found in, and the evidence under `curation`."""
    row = dict(envelope["record"])
    if "reason" in envelope:
        row["reason"] = envelope["reason"]
        if envelope.get("benchmark"):
            row["benchmark"] = envelope["benchmark"]
        row["curation"] = {k: envelope[k] for k in ("match", "overlap", "similarity", "duplicate_of", "pass_rate", "score",
                                                     "extracted") if k in envelope}
    return row
