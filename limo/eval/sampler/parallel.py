r"""Tensor parallelism for the sampler: one model split over T ranks of a process group.

Megatron's split, as vLLM serves a 32B model: q/k/v and gate/up are split by output columns
(each rank holds whole heads and a slice of the MLP's width), o_proj and down_proj by input rows,
and one all-reduce after each of those two sums the ranks' partial outputs (neither has a bias, so
the sum is the whole product). KV heads are split over the ranks, so each rank's paged cache holds
only its heads; when T exceeds the KV heads (7B's 4 at T=8) each KV head is held by T / Hkv ranks.
The embedding and the LM head are split by vocabulary: a token's row lives on one rank (the others
add zeros in the all-reduce), and the head's slices are gathered once per step for sampling, which
runs on rank 0 alone, so a request's seed draws the same tokens whatever T.

Each rank reads only its slices of the safetensors (HFCheckpoint.read with rows or columns).
Everything else (norms, biases of replicated tensors, RoPE) is the same on every rank. The shard
is our Qwen2 built with the rank's shapes (`TPLayout.rank_args`), its embedding and head swapped
for the vocabulary-parallel ones, and a forward hook on o_proj and down_proj that all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from limo.model.qwen2 import ModelArgs, Qwen2, build_model
from limo.model.weights import HFCheckpoint, WeightsError, hf_name
from limo.tools.collectives import all_gather_into
from limo.tools.errors import UserError


class ParallelismError(UserError):
    """A tensor-parallel size the model's shapes do not divide into."""


@dataclass(frozen=True)
class TPLayout:
    """What rank `rank` of `size` holds of a model with `args`."""

    args: ModelArgs
    rank: int
    size: int

    def __post_init__(self) -> None:
        a, T = self.args, self.size
        problems = [f"{name}={value} is not a multiple of tensor_parallel_size={T}"
                    for name, value in (("num_attention_heads", a.num_heads), ("intermediate_size", a.intermediate_size)) if value % T]
        if a.num_kv_heads % T and T % a.num_kv_heads:
            problems.append(f"num_key_value_heads={a.num_kv_heads} neither divides nor is divided by tensor_parallel_size={T}")
        if problems:
            raise ParallelismError("; ".join(problems))  # fmt: skip
        if not 0 <= self.rank < T:
            raise ValueError(f"rank {self.rank} outside a group of {T}")

    @property
    def heads(self) -> int:
        return self.args.num_heads // self.size

    @property
    def kv_heads(self) -> int:
        """KV heads on this rank: Hkv / T, or one shared by T / Hkv ranks."""
        return max(1, self.args.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        return self.rank * self.args.num_kv_heads // self.size if self.size > self.args.num_kv_heads else self.rank * self.kv_heads

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.args.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def rank_args(self) -> ModelArgs:
        """The shapes of this rank's Qwen2: its heads, KV heads, MLP width and vocabulary slice."""
        return replace(self.args, vocab_size=self.vocab_per_rank, num_heads=self.heads, num_kv_heads=self.kv_heads,
                       intermediate_size=self.args.intermediate_size // self.size, head_dim=self.args.head_dim)  # fmt: skip

    def slices(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the full tensor `name` that this rank holds; None: all of it."""
        a, D = self.args, self.args.head_dim
        leaf = name.rsplit(".", 2)[-2:]
        module, kind = leaf[0], leaf[1]
        if module in ("embed_tokens", "lm_head"):
            return 0, self.vocab_start, min(self.vocab_start + self.vocab_per_rank, a.vocab_size)
        if module == "q_proj":
            return 0, self.rank * self.heads * D, (self.rank + 1) * self.heads * D
        if module in ("k_proj", "v_proj"):
            return 0, self.kv_head_start * D, (self.kv_head_start + self.kv_heads) * D
        width = a.intermediate_size // self.size
        if module in ("gate_proj", "up_proj"):
            return 0, self.rank * width, (self.rank + 1) * width
        if module == "o_proj" and kind == "weight":
            return 1, self.rank * self.heads * D, (self.rank + 1) * self.heads * D
        if module == "down_proj":
            return 1, self.rank * width, (self.rank + 1) * width
        return None


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other ids give zeros, and the all-reduce sums."""

    def __init__(self, rows: int, hidden: int, start: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """This rank's vocabulary slice of the LM head; the logits of all slices are gathered."""

    def __init__(self, rows: int, hidden: int, vocab_size: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.vocab_size, self.group = vocab_size, group

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("a tensor-parallel model samples; it computes no loss")
        local = F.linear(hidden, self.weight)  # [T, V / size]
        size = dist.get_world_size(self.group)
        gathered = torch.empty(size * local.shape[0], local.shape[1], dtype=local.dtype, device=local.device)  # ranks stacked on dim 0
        all_gather_into(gathered, local.contiguous(), group=self.group)
        return gathered.view(size, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)[:, : self.vocab_size]  # [T, V]


def _all_reduce_hook(group: dist.ProcessGroup | None):
    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


def build_shard(layout: TPLayout, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
                group: dist.ProcessGroup | None = None) -> Qwen2:  # fmt: skip
    """This rank's Qwen2, unfilled (on the meta device: no memory). `model.args` keeps the rank's
    heads, KV heads and width (what the paged cache is sized by) and the whole vocabulary (what the
    gathered logits and the sampler see)."""
    rank_args = layout.rank_args()
    model = build_model(rank_args, device=device, dtype=dtype)
    with torch.device(device):
        model.embed_tokens = VocabParallelEmbedding(rank_args.vocab_size, rank_args.hidden_size, layout.vocab_start, group).to(dtype)
        model.lm_head = VocabParallelHead(rank_args.vocab_size, rank_args.hidden_size, layout.args.vocab_size, group).to(dtype)
    model.args = replace(rank_args, vocab_size=layout.args.vocab_size)
    model.tie_weights()
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(_all_reduce_hook(group))
        layer.mlp.down_proj.register_forward_hook(_all_reduce_hook(group))
    model.tp_layout = layout
    return model


def load_shard(path: str, layout: TPLayout, dtype: torch.dtype, device: torch.device | str,
               group: dist.ProcessGroup | None = None) -> Qwen2:  # fmt: skip
    """This rank's shard filled from the model folder, reading only its slices of each tensor."""
    ckpt = HFCheckpoint(path)
    ckpt.validate()
    if ckpt.args != layout.args:
        raise WeightsError(f"{path}: config.json describes {ckpt.args}, the layout was made for {layout.args}")
    model = build_shard(layout, "meta", dtype, group)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            cut = layout.slices(name)
            if cut is None:
                part = ckpt.read(name, dtype=dtype)
            else:
                dim, start, stop = cut
                part = ckpt.read(name, rows=slice(start, stop), dtype=dtype) if dim == 0 else ckpt.read(name, cols=slice(start, stop), dtype=dtype)
            if not torch.isfinite(part).all():
                ckpt.close()
                raise WeightsError(f"{path}: {hf_name(name)} holds NaN or inf; refusing to load a diverged model")
            param.zero_()  # the last rank's vocabulary rows past the vocabulary stay zero
            param[tuple(slice(0, n) for n in part.shape)].copy_(part)
    ckpt.close()
    return model


def shard_bytes(layout: TPLayout, dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes of one rank's weights (counted on the meta device)."""
    model = build_shard(layout, "meta", dtype)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize
