"""limo/model/flops.py, the one FLOP formula, against a count of every matmul of the architecture made
here by hand (integers: exact), and limo/tools/dtypes.py, the one dtype table."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from limo.model.flops import flop_coefficients, forward_flops, head_flops, layer_flops, step_flops, step_flops_torchtitan
from limo.model.qwen2 import PRESETS, ModelArgs
from limo.tools.dtypes import DTYPES, SHORT_NAMES, dtype_of

ODD = ModelArgs(vocab_size=97, hidden_size=48, intermediate_size=72, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=10)


def _by_hand(a: ModelArgs, lengths: list[int]) -> int:
    """Training FLOPs (forward + backward = 3 x forward) of every matmul, plus the elementwise
    parameters (biases, norms) counted like weights, as the formula does; causal attention."""
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_token_layer = 2 * a.hidden_size * (q + 2 * kv) + 2 * q * a.hidden_size + 3 * 2 * a.hidden_size * a.intermediate_size
    elementwise = a.num_layers * ((q + 2 * kv) + 2 * a.hidden_size) + a.hidden_size  # q/k/v biases, two norms a layer, the final norm
    head = 2 * a.vocab_size * a.hidden_size  # tied or not, the output projection is a matmul
    tokens = sum(lengths)
    forward = tokens * (a.num_layers * per_token_layer + head + 2 * elementwise)
    # scores and weighted values: 2 matmuls of 2 x L x L x q FLOPs each, half of them under the causal mask
    forward += a.num_layers * sum(2 * 2 * n * n * q // 2 for n in lengths)
    return 3 * forward


@pytest.mark.parametrize("args", [ODD, replace(ODD, tie_word_embeddings=True), PRESETS["qwen2.5-0.5b"], PRESETS["qwen2.5-32b"]],
                         ids=["odd", "odd-tied", "0.5b-tied", "32b"])
def test_step_flops_is_the_count_of_every_matmul(args):
    lengths = [1, 7, 130, 4096]
    assert step_flops(args, lengths) == _by_hand(args, lengths)
    assert forward_flops(args, lengths) * 3 == step_flops(args, lengths)
    linear, quadratic = flop_coefficients(args)
    assert step_flops_torchtitan(args, 100, 50) == (linear + 2 * quadratic * 50) * 100  # every token, the whole context


def test_layer_and_head_flops_add_up_to_the_step():
    lengths = [5, 300]
    for args in (ODD, replace(ODD, tie_word_embeddings=True)):
        rest = step_flops(args, lengths) - args.num_layers * layer_flops(args, lengths) - head_flops(args, sum(lengths))
        assert rest == 6 * args.hidden_size * sum(lengths)  # the final norm alone


def test_dtype_names_resolve_in_one_table():
    for name, dtype in DTYPES.items():
        assert dtype_of(name) is dtype and dtype_of(dtype) is dtype
    for short, name in SHORT_NAMES.items():
        assert dtype_of(short) is DTYPES[name]
    assert dtype_of("bf16", allowed=("bf16", "fp32")) is torch.bfloat16
    with pytest.raises(ValueError, match=r"train\.dtype='float8'; allowed: float64, float32, float16, bfloat16, fp64"):
        dtype_of("float8", what="train.dtype")
    with pytest.raises(ValueError, match=r"optim\.state_dtype='float16'; allowed: float32, bfloat16"):
        dtype_of("float16", allowed=("float32", "bfloat16"), what="optim.state_dtype")
    with pytest.raises(ValueError, match="allowed: bfloat16"):
        dtype_of(torch.float32, allowed=("bfloat16",))
