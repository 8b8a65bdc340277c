"""Look at a training set before paying for GPUs: lengths, cutoff losses, packing, rank balance.

    python -m limo.data.inspect --data FILE --tokenizer DIR --max-tokens 16384 [--world-size 8]
    python -m limo.data.inspect --data synthetic --max-tokens 512 --tokens-per-microbatch 2048 --world-size 2

Everything is computed exactly as training will (same rendering, same cutoff, same epoch-0
order and rank split), without building a model.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace
from typing import Sequence

from limo.data.dataset import load_samples, resolve_tokenizer
from limo.data.loader import PackedLoader
from limo.data.packing import CostModel, plan
from limo.model.qwen2 import PRESETS
from limo.tools.errors import UserError, refuse

PROG = "python -m limo.data.inspect"


def histogram(lengths: Sequence[int], bins: int, width: int = 40) -> list[str]:
    """Text bars over equal-width length bins from 0 to the longest sample."""
    top = max(lengths)
    step = max(1, math.ceil(top / bins))
    counts = [0] * math.ceil((top + 1) / step)
    for n in lengths:
        counts[n // step] += 1
    most = max(counts)
    return [f"  {i * step:>7}-{(i + 1) * step - 1:<7} {c:>6} {'#' * math.ceil(width * c / most)}" for i, c in enumerate(counts)]


def percentile(sorted_values: Sequence[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def epoch_packing(loader: PackedLoader) -> dict[str, float]:
    """Epoch 0's plans on every rank: passes (vs one sample per pass), token efficiency, compute imbalance."""
    slots = tokens = micro_total = unpacked = 0
    imbalances = []
    order = loader.order(0)
    for k in range(loader.steps_per_epoch):
        lengths = [len(loader.samples[i]) for i in order[k * loader.samples_per_step : (k + 1) * loader.samples_per_step]]
        assignment = plan(lengths, loader.world_size, loader.budget, loader.cost)
        micro = max(len(r) for r in assignment)
        micro_total += micro
        unpacked += math.ceil(len(lengths) / loader.world_size)
        slots += loader.world_size * micro * loader.budget
        tokens += sum(lengths)
        costs = [sum(loader.cost(lengths[i]) for group in r for i in group) for r in assignment]
        imbalances.append(max(costs) * loader.world_size / sum(costs))
    return {
        "passes": micro_total,
        "unpacked_passes": unpacked,
        "micro_per_step": micro_total / loader.steps_per_epoch,
        "efficiency": tokens / slots,
        "imbalance_mean": sum(imbalances) / len(imbalances),
        "imbalance_max": max(imbalances),
    }


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, SimpleNamespace]:
    """The command line, and the [data] settings it spells (a data.dataset.DataSettings), checked."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="'synthetic', a .jsonl/.json/.parquet file, or a hub dataset id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the byte-level one for synthetic data)")
    p.add_argument("--format", default="auto", choices=["auto", "limo", "messages", "alpaca"])
    p.add_argument("--system-prompt", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--max-tokens", type=int, default=16384, help="per-sample cutoff")
    p.add_argument("--overlong", default="drop", choices=["drop", "truncate"])
    p.add_argument("--tokens-per-microbatch", type=int, default=None, help="token budget per GPU (default: --max-tokens)")
    p.add_argument("--samples-per-step", type=int, default=32, help="global batch in samples")
    p.add_argument("--world-size", type=int, default=1, help="ranks in the run")
    p.add_argument("--cp", type=int, default=1, help="context parallelism (parallel.cp): ranks sharing each micro-batch; the data "
                                                    "is dealt over world-size / cp groups")
    p.add_argument("--seed", type=int, default=0, help="data-order seed")
    p.add_argument("--model-preset", default="qwen2.5-32b", choices=sorted(PRESETS),
                   help="architecture whose FLOPs weigh each sample for the rank split, as training does (default qwen2.5-32b)")
    p.add_argument("--bins", type=int, default=12, help="histogram bins")
    args = p.parse_args(argv)
    cfg = SimpleNamespace(  # as a run's [data] section would say it
        path=args.data, format=args.format, tokenizer=args.tokenizer, system_prompt=args.system_prompt, max_tokens=args.max_tokens,
        overlong=args.overlong, tokens_per_microbatch=args.tokens_per_microbatch or args.max_tokens, samples_per_step=args.samples_per_step,
        synthetic_samples=817,
    )
    sizes = {"--max-tokens": cfg.max_tokens, "--tokens-per-microbatch": cfg.tokens_per_microbatch, "--samples-per-step": cfg.samples_per_step,
             "--world-size": args.world_size, "--cp": args.cp}  # fmt: skip
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise SystemExit(refuse(f"{', '.join(bad)} must be >= 1", PROG))
    if all(v >= 1 for v in sizes.values()) and args.world_size % args.cp:
        raise SystemExit(refuse(f"--cp={args.cp} does not divide --world-size={args.world_size}", PROG))
    if cfg.tokens_per_microbatch < cfg.max_tokens:
        raise SystemExit(refuse(f"--tokens-per-microbatch={cfg.tokens_per_microbatch} is smaller than --max-tokens={cfg.max_tokens}: "
                                "the longest sample must fit one micro-batch", PROG))
    return args, cfg


def main(argv: list[str] | None = None) -> str:
    args, cfg = _parse(argv)
    try:
        samples, report = load_samples(cfg, resolve_tokenizer(cfg))
    except UserError as e:  # DataError: the file and line, the key, the folder
        raise SystemExit(refuse(e, PROG)) from None
    lengths = sorted(len(s) for s in samples)
    cost = CostModel.for_model(PRESETS[args.model_preset])
    loader = PackedLoader(samples, samples_per_step=cfg.samples_per_step, tokens_per_microbatch=cfg.tokens_per_microbatch, epochs=1,
                          world_size=args.world_size // args.cp, seed=args.seed, cost=cost)  # fmt: skip
    packing = epoch_packing(loader)
    last = len(samples) - (loader.steps_per_epoch - 1) * cfg.samples_per_step
    quantiles = ", ".join(f"p{round(q * 100)} {percentile(lengths, q)}" for q in (0.5, 0.9, 0.99))
    lines = [
        report.summary(),
        f"lengths: min {lengths[0]}, {quantiles}, max {lengths[-1]}",
        *histogram(lengths, args.bins),
        f"over the cutoff of {cfg.max_tokens}: {report.overlong} ({cfg.overlong}: {report.truncated} truncated, {report.dropped} dropped)",
        f"tokens per epoch: {report.tokens} ({report.label_tokens} supervised, {report.label_tokens / report.tokens:.1%})",
        f"steps per epoch: {loader.steps_per_epoch} of {cfg.samples_per_step} samples (last: {last})",
        f"packing at {cfg.tokens_per_microbatch} tokens x {args.world_size} ranks: "
        f"{packing['micro_per_step']:.2f} micro-batches per rank per step, "
        f"{packing['efficiency']:.1%} of token slots used",
        f"forward/backward passes per rank per epoch: {packing['passes']} packed, "
        f"{packing['unpacked_passes']} with one sample per pass (LIMO's recipe)",
        f"per-rank compute imbalance (max / mean, costs of {args.model_preset}): "
        f"mean {packing['imbalance_mean']:.3f}, worst {packing['imbalance_max']:.3f}",
    ]
    if args.cp > 1:
        parts = 2 * args.cp
        padded = sum(-(-n // parts) * parts for n in lengths)
        lines[-3] = lines[-3].replace(f"x {args.world_size} ranks", f"x {args.world_size // args.cp} data-parallel groups of {args.cp} ranks")
        lines.append(f"context parallel x{args.cp} (limo/data/context.py): each micro-batch's tokens over {args.cp} ranks, "
                     f"{cfg.tokens_per_microbatch // args.cp} per rank in a full one, plus {(padded - sum(lengths)) / sum(lengths):.2%} "
                     f"padding (documents to a multiple of {parts}); within a group every rank holds as many tokens and as much "
                     "attention work (a front and the matching back chunk of every document): imbalance 1.000")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
