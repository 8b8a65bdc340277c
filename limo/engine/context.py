"""Context parallelism (`parallel.cp`): one micro-batch's tokens over cp ranks, attention across them.

Everything in a decoder block but attention is token by token, so each rank runs the model on its
share of the tokens (limo/data/context.py: a balanced front and back chunk of every document)
with its documents' own position ids. Attention is the one place ranks meet: inside each layer the
rank's K and V are all-gathered over the cp group in one collective ([T, 2 Hkv, D]: with GQA a
fifth of the hidden size at 32B), each chunk's queries attend to their document's keys up to the
chunk's end, and in backward the K/V gradients are reduce-scattered back to the ranks that own
them (NCCL; gloo, which has no reduce-scatter, all-reduces and keeps its slice). Under full
activation checkpointing the gather runs again in the recompute, like any other op of the block.

The loss needs nothing new: each rank sums the loss of its own tokens, the global divisor counts
each supervised token once, and FSDP's gradient reduction (a sum over every rank, cp ranks
included) adds the cp ranks' partial gradients as it adds the data-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from limo import kernels
from limo.data.context import ContextShard
from limo.tools.collectives import all_gather_into


class _GatherTokens(torch.autograd.Function):
    """All-gather along the token dimension; backward sums the gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty(size * x.shape[0], *x.shape[1:])
        all_gather_into(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        n = grad.shape[0] // size
        if grad.is_cuda:  # NCCL (also under CPU offload's "cuda:nccl,cpu:gloo")
            mine = grad.new_empty(n, *grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad.contiguous(), group=group)
            return mine, None
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)  # gloo: no reduce-scatter
        return total[rank * n:(rank + 1) * n], None


@dataclass
class ContextParallelAttention:
    """The model's attention context on one cp rank (limo/model/qwen2.py's AttentionContext)."""

    group: dist.ProcessGroup
    shard: ContextShard  # on the device

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = k.shape[1]
        kv = _GatherTokens.apply(torch.cat([k, v], dim=1), self.group)  # [cp * T, 2 Hkv, D]
        kv = kv[self.shard.gather_index]  # each chunk's document prefix, in segment order
        s = self.shard
        return kernels.varlen_attention(q, kv[:, :heads], kv[:, heads:], s.cu_q, s.max_q, cu_seqlens_k=s.cu_k, max_seqlen_k=s.max_k)


def cp_loss(model: torch.nn.Module, shard: ContextShard, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's summed loss over its tokens of a micro-batch."""
    ctx = ContextParallelAttention(group, shard)
    return model(shard.input_ids, shard.position_ids, labels=shard.labels, ctx=ctx)


def cp_bytes_per_pass(args, tokens: int, cp: int, itemsize: int = 2, recompute: bool = True) -> int:
    """Bytes one rank sends per micro-batch pass of `tokens` tokens over its cp group, on a ring:
    per layer, the K/V all-gather in forward (again in the recompute of a checkpointed layer) and
    the reduce-scatter of their gradients in backward, each (cp - 1) / cp of the gathered size."""
    if cp <= 1:
        return 0
    gathered = cp * -(-tokens // cp) * 2 * args.num_kv_heads * args.head_dim * itemsize
    return int(args.num_layers * gathered * (3 if recompute else 2) * (cp - 1) / cp)
