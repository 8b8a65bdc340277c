"""The long chain-of-thought length distribution that benchmarks and the simulated step draw packed micro-batches from.

    python -m limo.data.lengths --check      # re-derive from ../shared and compare with the committed file
    python -m limo.data.lengths --write      # re-derive and overwrite limo/data/long_cot_lengths.json

Why a proxy: the GPU machine sees only the repository, not ../shared, and the LIMO set itself is
not in ../shared. Its nearest stand-in there is the Sky-T1 long-CoT outputs in
../shared/data/graded_outputs (32B-class models answering MATH500, AIME24 and AMC23 at up to
32k new tokens). Each record becomes the conversation the engine would train on (user: the
question, assistant: the model's output, the Qwen2.5 chat template with its default system
prompt), rendered and tokenized as data.chat.encode does it (a few runaway outputs contain chat
control tokens, which encode refuses, so the rendered text is tokenized directly); its token
count is kept and the text is not. Only the integers are committed (a few KB).

Caveat, printed by the projection too: these answers are shorter on average than LIMO's
(ANCHORS.md estimates ~5k tokens per LIMO sample from its 16.1 MB; MATH500, most of this proxy,
is easier than LIMO's problems), so tokens per epoch from this proxy are a lower estimate.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from limo.data.chat import render_ids

ROOT = Path(__file__).resolve().parents[2]
DATA_FILE = Path(__file__).resolve().parent / "long_cot_lengths.json"
SHARED = ROOT.parent / "shared"
GRADED = Path("data/graded_outputs/skythought_qwen25math_harness")
TOKENIZER = Path("data/tokenizers/qwen2.5")
SOURCES = (
    "Sky-T1-math-correct-5K-27B/math500.jsonl",
    "Sky-T1-math-correct-5K-32B_ckpt140/aime24.jsonl",
    "Sky-T1-math-corrupt-0.2-32B/amc23.jsonl",
)
LIMO_CUTOFF = 16384  # LIMO's per-sample cutoff in tokens


def derive(shared: Path = SHARED, limit: int | None = None) -> dict[str, list[int]]:
    """Token counts of each source's conversations, in file order (the first `limit` of each)."""
    from transformers import AutoTokenizer

    tokenizer_dir = shared / TOKENIZER
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir} is missing: the shared data folder must sit beside the project as ../shared")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out: dict[str, list[int]] = {}
    for name in SOURCES:
        path = shared / GRADED / name
        lengths = []
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if limit is not None and len(lengths) >= limit:
                    break
                record = json.loads(line)
                try:
                    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["code"][0]}]
                except (KeyError, IndexError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: expected fields 'question' and 'code'[0] ({e!r})") from None
                lengths.append(len(render_ids(tokenizer, messages)))
        out[name] = lengths
    return out


def describe(per_source: dict[str, list[int]]) -> dict:
    """The committed file's content: the lengths, where they came from and how."""
    every = [n for lengths in per_source.values() for n in lengths]
    capped = [min(n, LIMO_CUTOFF) for n in every]
    return {
        "how": (
            "python -m limo.data.lengths --write: each record of the sources (user: question, assistant: code[0]) rendered "
            "with the Qwen2.5 chat template (default system prompt) and tokenized with the Qwen2.5 tokenizer, as "
            "data.chat.encode does; token counts only, uncapped, in file order"
        ),
        "sources": {f"../shared/{GRADED}/{name}": len(lengths) for name, lengths in per_source.items()},
        "count": len(every),
        "mean": round(statistics.fmean(every), 1),
        "median": statistics.median(every),
        "max": max(every),
        "mean_capped_16384": round(statistics.fmean(capped), 1),
        "over_16384": sum(n > LIMO_CUTOFF for n in every),
        "lengths": per_source,
    }


def load(path: Path = DATA_FILE) -> list[int]:
    """Every committed length, uncapped."""
    try:
        payload = json.loads(path.read_text())
        lengths = [n for per_source in payload["lengths"].values() for n in per_source]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a length distribution written by `python -m limo.data.lengths --write` ({e!r})") from None
    bad = [n for n in lengths if not isinstance(n, int) or n < 1]
    if not lengths or bad:
        raise ValueError(f"{path}: lengths must be positive integers (bad: {bad[:5]}, count {len(lengths)})")
    return lengths


def draw(count: int, seed: int, cap: int = LIMO_CUTOFF, scale: float = 1.0, lengths: list[int] | None = None) -> list[int]:
    """`count` sample lengths drawn with replacement, each multiplied by `scale` (smoke runs shrink
    them to tiny micro-batches), rounded, then capped at `cap` (LIMO's cutoff) and at least 2."""
    pool = lengths if lengths is not None else load()
    rng = random.Random(seed)
    return [max(2, min(cap, round(rng.choice(pool) * scale))) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.data.lengths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (default: ../shared beside the repo)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"derive and write {DATA_FILE.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="derive and compare with the committed file (exit 1 if they differ)")
    args = p.parse_args(argv)
    payload = describe(derive(args.shared))
    if args.write:
        DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
        DATA_FILE.write_text(json.dumps(payload) + "\n")
        print(f"wrote {DATA_FILE}: {payload['count']} lengths, mean {payload['mean']}, median {payload['median']}, max {payload['max']}")
        return 0
    committed = json.loads(DATA_FILE.read_text())
    same = committed["lengths"] == payload["lengths"]
    print(f"{DATA_FILE}: {'matches' if same else 'DIFFERS FROM'} a fresh derivation from {args.shared}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
