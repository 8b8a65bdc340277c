"""`python -m limo.curate`: the command line (see limo/curate/__init__.py and README's Curation)."""

from __future__ import annotations

import argparse
import sys

from limo.curate.decontaminate import DEFAULT_OVERLAP, DEFAULT_SIMILARITY
from limo.curate.dedup import DEFAULT_THRESHOLD
from limo.curate.difficulty import parse_band
from limo.curate.pipeline import STEPS, run
from limo.curate.score import DEFAULT_WEIGHTS, TRAITS, parse_weights
from limo.curate.select import DEFAULT_FAMILY_THRESHOLD, DEFAULT_N
from limo.data.suites import DEFAULT_DATA
from limo.tools.errors import UserError, refuse


def _checked(parse):
    """An argparse type that reports the parser's own message (argparse hides a ValueError's)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def _steps(text: str) -> tuple[str, ...]:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown steps {unknown}; choose from {','.join(STEPS)}")
    return steps


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m limo.curate", description="Curate a LIMO-style training set from a pool.")
    p.add_argument("--pool", nargs="+", required=True, help="pool files (.jsonl, .json, .parquet) or hub ids in any layout "
                   "limo/data/sources.py reads: LIMO, messages, alpaca")
    p.add_argument("--out", required=True, help="output folder: kept.jsonl, removed.jsonl, report.md, figures/, steps/")
    p.add_argument("--steps", type=_steps, help=f"comma-separated, run in this order: {','.join(STEPS)} "
                   "(default all; difficulty runs only with --model)")
    p.add_argument("--force", action="store_true", help="redo the listed steps even when their output is up to date")
    g = p.add_argument_group("dedup and decontaminate")
    g.add_argument("--dup-threshold", type=float, default=DEFAULT_THRESHOLD, help="near-duplicate Jaccard on token trigrams (default 0.8)")
    g.add_argument("--eval-dir", default=str(DEFAULT_DATA), help="evaluation suites, <dir>/<name>/test.jsonl (default ../shared/data/eval)")
    g.add_argument("--ngram-overlap", type=float, default=DEFAULT_OVERLAP, help="shared 8-gram share that is contamination (default 0.5)")
    g.add_argument("--similarity", type=float, default=DEFAULT_SIMILARITY,
                   help="bigram Jaccard that is contamination for short problems (default 0.6)")
    g = p.add_argument_group("difficulty")
    g.add_argument("--model", help="HF model folder to draw samples from (our sampler)")
    g.add_argument("--samples", type=int, default=8, help="samples per problem, K (default 8)")
    g.add_argument("--band", type=_checked(parse_band), default=(0.05, 0.5), help="keep pass rates LO <= p <= HI (default 0.05,0.5)")
    g.add_argument("--temperature", type=float, default=0.7, help="(default 0.7)")
    g.add_argument("--max-tokens", type=int, default=4096, help="new tokens per sample (default 4096)")
    g.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds (default 0)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="samples per generate call and per flush to disk (default 256)")
    g.add_argument("--device", help="(default cuda when present, else cpu)")
    g.add_argument("--dtype", help="(default bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sampler: sequences decoded together (default 64)")
    g.add_argument("--num-blocks", type=int, help="sampler: KV pages (default: sized from memory on cuda, from the batch on cpu)")
    g = p.add_argument_group("score and select")
    g.add_argument("--weights", type=_checked(parse_weights), default=DEFAULT_WEIGHTS,
                   help=f"{','.join(TRAITS)} (default LIMO's {','.join(str(v) for v in DEFAULT_WEIGHTS.values())})")
    g.add_argument("--select", type=int, default=DEFAULT_N, help="records to keep (default 817)")
    g.add_argument("--per-cluster", type=int, default=1, help="records per problem family (default 1)")
    g.add_argument("--per-source", type=float, default=0.5,
                   help="largest share of --select from one source, when there are several (default 0.5)")
    g.add_argument("--family-threshold", type=float, default=DEFAULT_FAMILY_THRESHOLD, help="trigram Jaccard of one family (default 0.5)")
    g.add_argument("--tokenizer", help="tokenizer folder for the report's lengths (default --model's; else words)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = STEPS if args.model else tuple(s for s in STEPS if s != "difficulty")
        if not args.model:
            print("difficulty: no --model to draw samples from, so the step is left out", flush=True)
    elif "difficulty" in args.steps and not args.model:
        p.error("--steps names difficulty, which needs --model (the model to draw samples from)")
    try:
        run(args)
    except UserError as e:  # a pool file's line, a record's key, a folder: one line, not a traceback
        return refuse(e, "python -m limo.curate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
