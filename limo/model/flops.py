"""The model's FLOP count: the one formula MFU, the packer's cost model, the projections and the
benchmarks all use (ANCHORS.md's, causal-aware).

A training step over samples of lengths L_i costs
    linear * sum(L_i) + quadratic * sum(L_i^2),
    linear    = 6 x (parameters - embedding): forward and backward of every matmul, the head included
                (a tied head too: its matmul costs the same)
    quadratic = 6 x layers x heads x head_dim: causal attention, half the scores of each sample
A forward alone (a prefill) is a third of that. torchtitan's count, reported beside ours for
comparisons, charges every token the whole context, non-causally.
"""

from __future__ import annotations

import math
from dataclasses import replace

from limo.model.qwen2 import ModelArgs


def flop_coefficients(args: ModelArgs) -> tuple[float, float]:
    """(linear, quadratic): a training step over one sample of length L costs linear * L + quadratic * L^2.
    A tied head is the embedding's matrix, which num_params(embeddings=False) leaves out, but its
    matmul costs what an untied one does."""
    tied_head = args.vocab_size * args.hidden_size if args.tie_word_embeddings else 0
    return 6.0 * (args.num_params(embeddings=False) + tied_head), 6.0 * args.num_layers * args.num_heads * args.head_dim


def step_flops(args: ModelArgs, seqlens: list[int]) -> float:
    """Training FLOPs of one step over packed samples of these lengths (causal attention)."""
    linear, quadratic = flop_coefficients(args)
    return linear * sum(seqlens) + quadratic * math.fsum(n * n for n in seqlens)


def forward_flops(args: ModelArgs, seqlens: list[int]) -> float:
    """A forward pass alone (a prefill): one multiply-add per weight and score instead of three."""
    return step_flops(args, seqlens) / 3.0


def layer_flops(args: ModelArgs, seqlens: list[int]) -> float:
    """Training FLOPs of one decoder layer over these samples."""
    return step_flops(replace(args, num_layers=2), seqlens) - step_flops(replace(args, num_layers=1), seqlens)


def head_flops(args: ModelArgs, tokens: int) -> float:
    """Training FLOPs of the output projection (the embedding is a lookup: no FLOPs counted)."""
    return 6.0 * args.vocab_size * args.hidden_size * tokens


def step_flops_torchtitan(args: ModelArgs, num_tokens: int, context: int) -> float:
    """torchtitan's count: every token attends to the whole `context`, non-causally."""
    linear, quadratic = flop_coefficients(args)
    return (linear + 2.0 * quadratic * context) * num_tokens
