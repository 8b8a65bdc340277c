"""The steps in order, each reading the previous one's output; resumable; then the outputs.

A step runs when it is asked for (--steps) and its folder has no done.json for the same input and
settings; otherwise its earlier output is reused. A step not asked for is passed over, but an
earlier run's output of it is still used when it was made from the same input (so `--steps
score,select` after a full run re-scores what the difficulty step kept); one made from another
input is an error when a later step is asked for (rather than a silent skip of, say,
decontamination), and otherwise where the outputs stop.

At the end, whatever ran: DIR/kept.jsonl (the last step's records, in LIMO's layout: see
records.as_limo),
DIR/removed.jsonl (every removal, with its reason), DIR/report.md and DIR/figures/.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

from limo.curate.decontaminate import remove_contaminated
from limo.curate.dedup import remove_duplicates
from limo.curate.difficulty import draw_and_grade, filter_by_band
from limo.curate.records import StepDir, as_limo, as_removal, file_hash, read_jsonl, read_pool, write_jsonl
from limo.curate.report import write_report
from limo.curate.score import score_chains
from limo.curate.select import select_top
from limo.model.fingerprint import model_fingerprint
from limo.tools.errors import UserError

STEPS = ("dedup", "decontaminate", "difficulty", "score", "select")


def settings(step: str, args: argparse.Namespace, model_id: str | None) -> dict[str, Any]:
    """What a step's output depends on besides its input: a change reruns it."""
    if step == "dedup":
        return {"dup_threshold": args.dup_threshold}
    if step == "decontaminate":
        files = sorted(Path(args.eval_dir).glob("*/test.jsonl"))
        return {"eval": {f.parent.name: file_hash(f) for f in files}, "ngram_overlap": args.ngram_overlap,
                "similarity": args.similarity}
    if step == "difficulty":
        return {"model": model_id, "samples": args.samples, "band": list(args.band), "temperature": args.temperature,
                "max_tokens": args.max_tokens, "seed": args.seed}
    if step == "score":
        return {"weights": args.weights}
    return {"select": args.select, "per_cluster": args.per_cluster, "per_source": args.per_source,
            "family_threshold": args.family_threshold}


def _build_generator(args: argparse.Namespace) -> Callable:
    """Our sampler on --model; on CPU with a KV cache sized for the batch, not for the machine."""
    import torch

    from limo.eval.generators import LLMGenerator
    from limo.eval.run import context_len
    from limo.eval.sampler import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_len = context_len(args.model, args.max_tokens)
    num_blocks = args.num_blocks
    if num_blocks is None and device == "cpu":
        num_blocks = args.max_num_seqs * math.ceil(min(max_len, args.max_tokens + 512) / 16)
    llm = LLM(args.model, dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), device=device,
              num_blocks=num_blocks, max_num_seqs=args.max_num_seqs, max_model_len=max_len)
    return LLMGenerator(llm, use_tqdm=False)


def _run_step(step: str, rows: list[dict], folder: StepDir, args: argparse.Namespace) -> tuple[list, list, dict]:
    if step == "dedup":
        return remove_duplicates(rows, args.dup_threshold)
    if step == "decontaminate":
        return remove_contaminated(rows, Path(args.eval_dir), args.ngram_overlap, args.similarity)
    if step == "difficulty":
        drawn = {"model": args.model_id, "temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed}
        results = draw_and_grade(rows, _build_generator(args), folder.path, samples=args.samples, temperature=args.temperature,
                                 max_tokens=args.max_tokens, seed=args.seed, batch_size=args.batch_size, settings=drawn)
        return filter_by_band(rows, results, args.samples, args.band)
    if step == "score":
        return score_chains(rows, args.weights)
    return select_top(rows, args.select, args.per_cluster, args.per_source, args.family_threshold)


def _pool_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0{file_hash(Path(p)) if Path(p).is_file() else p}\0".encode())
    return h.hexdigest()[:16]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline; returns {"kept": n, "removed": n, "report": path}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = read_pool(args.pool)
    args.model_id = None
    if args.model:
        args.model_id = model_fingerprint(args.model)
    rows, input_hash = pool, _pool_hash(args.pool)
    used: list[tuple[str, StepDir]] = []
    for step in STEPS:
        folder = StepDir(out, step)
        stamp = {"input": input_hash, "settings": settings(step, args, args.model_id)}
        if step in args.steps:
            if folder.finished(stamp) and not args.force:
                print(f"{step}: done earlier with the same input and settings; reusing {folder.path}", flush=True)
            else:
                start = time.perf_counter()
                kept, gone, stats = _run_step(step, rows, folder, args)
                stats["seconds"] = round(time.perf_counter() - start, 1)
                folder.write(kept, gone, stamp, stats)
                print(f"{step}: {stats}", flush=True)
        elif folder.done.exists():
            if folder.stamp()["input"] != input_hash:
                if any(later in args.steps for later in STEPS[STEPS.index(step) + 1:]):
                    raise UserError(f"{folder.path} was made from another input than this run gives it; add {step} to "
                                     f"--steps to redo it (or delete the folder to leave the step out)")
                print(f"{step}: its earlier output was made from another input; the outputs stop before it", flush=True)
                break
            print(f"{step}: not asked for; using its earlier output {folder.path}", flush=True)
        else:
            continue
        used.append((step, folder))
        rows, input_hash = read_jsonl(folder.kept), file_hash(folder.kept)
    return finish(out, pool, used, args)


def finish(out: Path, pool: list[dict], used: list[tuple[str, StepDir]], args: argparse.Namespace) -> dict[str, Any]:
    kept = read_jsonl(used[-1][1].kept) if used else pool
    gone = [e for _, folder in used for e in read_jsonl(folder.removed)]
    write_jsonl(out / "kept.jsonl", (as_limo(e) for e in kept))
    write_jsonl(out / "removed.jsonl", (as_removal(e) for e in gone))
    by_step = dict(used)
    scored = read_jsonl(by_step["score"].kept) if "score" in by_step else []
    rated = (read_jsonl(by_step["difficulty"].kept) + read_jsonl(by_step["difficulty"].removed)) if "difficulty" in by_step else []
    report = write_report(out, [(name, folder.stats()) for name, folder in used], len(pool), pool, scored, rated, kept, gone,
                          _token_counter(args))
    print(f"kept {len(kept)} records in {out / 'kept.jsonl'}, removed {len(gone)} in {out / 'removed.jsonl'}; "
          f"report {report}", flush=True)
    return {"kept": len(kept), "removed": len(gone), "report": str(report)}


def _token_counter(args: argparse.Namespace) -> Callable[[str], int] | None:
    folder = args.tokenizer or args.model
    if not folder:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
