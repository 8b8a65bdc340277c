"""The Qwen2 decoder as the Qwen2.5 family (0.5B-72B) uses it, packed-first.

A forward pass takes one 1-D stream of T tokens that may hold several samples; `cu_seqlens`
marks their boundaries and attention never crosses them. Position ids restart at 0 in each
sample. The model knows nothing of parallelism: it is built on any device (the meta device
included), and sharding, checkpointing and compile are applied from outside (limo/engine/sharding.py).

Module names mirror transformers' Qwen2ForCausalLM (`layers.3.self_attn.q_proj.weight` is
`model.layers.3.self_attn.q_proj.weight` there), so HF weights map by a prefix alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from limo import kernels
from limo.tools.errors import UserError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


class ArchitectureError(UserError):
    """A config.json that does not describe a model this engine implements."""


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads, as in HF's Qwen2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ArchitectureError(f"{name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ArchitectureError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ArchitectureError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Read a transformers config.json dict; anything this model does not implement is an error."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "qwen2" or (archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)):
            raise ArchitectureError(
                f"{source}: unknown architecture (architectures={archs}, model_type={cfg.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} with model_type 'qwen2'"
            )
        if cfg.get("use_sliding_window"):
            raise ArchitectureError(f"{source}: use_sliding_window=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ArchitectureError(f"{source}: hidden_act={cfg['hidden_act']!r}; only 'silu' is supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ArchitectureError(f"{source}: rope scaling {rope} is not supported; only default RoPE")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                head_dim=cfg.get("head_dim"),
                rope_theta=float(theta),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
            )
        except KeyError as e:
            raise ArchitectureError(f"{source}: missing key {e.args[0]!r}") from None

    def to_hf(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
        """A config.json dict that transformers' AutoModelForCausalLM (and vLLM) load."""
        return {
            "architectures": list(SUPPORTED_ARCHITECTURES),
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; `embeddings=False` leaves out the input embedding (not lm_head)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        block = attn + mlp + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        embed = self.vocab_size * self.hidden_size if embeddings else 0
        return embed + self.num_layers * block + self.hidden_size + head


_QWEN25 = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645)

PRESETS: dict[str, ModelArgs] = {
    # The demo's model: small enough to fine-tune on two CPU processes in minutes. Its vocabulary
    # covers the byte-level tokenizer of limo/data/synthetic.py (256 bytes + chat special tokens).
    "tiny": ModelArgs(vocab_size=320, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2, rope_theta=10_000.0),
    "qwen2.5-0.5b": ModelArgs(151936, 896, 4864, 24, 14, 2, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-1.5b": ModelArgs(151936, 1536, 8960, 28, 12, 2, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-3b": ModelArgs(151936, 2048, 11008, 36, 16, 2, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-7b": ModelArgs(152064, 3584, 18944, 28, 28, 4, **_QWEN25),
    "qwen2.5-14b": ModelArgs(152064, 5120, 13824, 48, 40, 8, **_QWEN25),
    "qwen2.5-32b": ModelArgs(152064, 5120, 27648, 64, 40, 8, **_QWEN25),
    "qwen2.5-72b": ModelArgs(152064, 8192, 29568, 80, 64, 8, **_QWEN25),
}

# Hub ids of the Qwen2.5 family -> the preset holding their architecture (the Instruct and base
# models share it), so planning and the checks that need no weights work with no network: compute
# nodes often have none, and "will it fit?" comes before a 65 GB download.
HUB_PRESETS: dict[str, str] = {
    f"Qwen/Qwen2.5-{size}{kind}": f"qwen2.5-{size.lower()}"
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
    for kind in ("", "-Instruct")
}


# ---------------------------------------------------------------------------------------------
# Attention contexts: how a layer's q, k, v become its output. The model does not know which.


class AttentionContext(Protocol):
    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotated) -> [T, Hq, D]."""
        ...


@dataclass
class VarlenContext:
    """Causal attention within each packed sample (training and prefill without a cache)."""

    cu_seqlens: torch.Tensor  # [n+1] int32
    max_seqlen: int
    scale: float | None = None

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, self.scale)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[0, 1, ..., len0-1, 0, 1, ..., len1-1, ...] without a host sync."""
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), cu_seqlens.diff().long(), output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for rotate-half RoPE; angles in float32, as in transformers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by position; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x; with `residual`, normalise x + residual and also return that sum."""
        return kernels.rmsnorm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=True)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        o = ctx.attention(self.layer, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: h -> h + attn(norm(h)) -> (that) + mlp(norm(that)).

    Only the residual stream h crosses a layer boundary, so activation checkpointing saves one
    [T, H] tensor per layer. Inside the block the second norm adds the attention output to the
    stream as it normalises (kernels.rmsnorm's fused residual), reading the stream once.
    """

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        normed, h = self.post_attention_layernorm(attn, h)
        return h + self.mlp(normed)


class LMHead(nn.Module):
    """Output projection; with labels it returns the summed token loss without [T, V] logits.

    The loss lives in this module's forward so that a sharding wrapper around the head
    gathers its weight for exactly this use.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(hidden, self.weight)  # [T, V]
        return kernels.fused_linear_cross_entropy(hidden, self.weight, labels, reduction="sum")


class Qwen2(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when tied; call again after `to_empty`, which unties."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        *,
        labels: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]; with `labels` [T], the summed loss instead.

        labels[t] is the target of position t (already shifted within each sample, -100 where
        nothing is supervised). cu_seqlens [n+1] int32 defaults to one sample of T tokens;
        max_seqlen (the longest sample) is computed from it, with a host sync, when not given.
        `ctx` replaces the packed-varlen attention (the sampler passes its paged context).
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a 1-D packed stream [T], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[0]
        if ctx is None:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=input_ids.device)
                max_seqlen = T
            elif max_seqlen is None:
                max_seqlen = int(cu_seqlens.diff().max())  # host sync: pass max_seqlen to avoid it
            ctx = VarlenContext(cu_seqlens, max_seqlen)
        if position_ids is None:
            if cu_seqlens is None:
                raise ValueError("position_ids are required when an attention context is given without cu_seqlens")
            position_ids = positions_from_cu_seqlens(cu_seqlens, T)
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = rotary_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        hidden = self.norm(x)
        return hidden if labels is None else self.lm_head(hidden, labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V]; for sampling and tests (training never materialises these)."""
        return self.lm_head(hidden)


# What torch's checkpoint_wrapper inserts into parameter names (compile is applied in place: it adds nothing).
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    """A parameter name as the model names it, without the checkpoint wrapper's fragment."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def build_model(args: ModelArgs, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> Qwen2:
    """The model on `device` in `dtype`; on the meta device no memory is allocated."""
    with torch.device(device):
        model = Qwen2(args).to(dtype)
    return model
