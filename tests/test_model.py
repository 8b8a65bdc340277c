"""Our Qwen2 against transformers' Qwen2ForCausalLM: values, packing, gradients, construction."""

import json

import pytest
import torch

from limo.model.init import init_weights
from limo.model.qwen2 import PRESETS, ArchitectureError, ModelArgs, build_model, positions_from_cu_seqlens
from tests.conftest import ours_from_hf, random_hf_qwen2, rel_err, shared_path

CONFIGS = {
    "untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    "odd-sizes": dict(vocab_size=211, hidden_size=40, intermediate_size=77, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=3),
    "mha-theta1e6-eps1e-5": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-5),
    "theta500-eps1e-3": dict(rope_theta=500.0, rms_norm_eps=1e-3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf = random_hf_qwen2(seed=1, **CONFIGS[name])
    ours = ours_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (37,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = ours.logits(ours(ids))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["untied", "tied", "odd-sizes"])
def test_packed_stream_matches_each_sample_alone(name):
    hf = random_hf_qwen2(seed=3, **CONFIGS[name])
    ours = ours_from_hf(hf)
    lengths = [7, 1, 19, 11]
    ids = torch.randint(0, hf.config.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        want = torch.cat([hf(ids[a:b][None]).logits[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        derived = ours.logits(ours(ids, cu_seqlens=cu))
        explicit = ours.logits(ours(ids, positions_from_cu_seqlens(cu, len(ids)), cu, max(lengths)))
    assert rel_err(derived, want) < 1e-5
    assert torch.equal(derived, explicit)


def test_positions_restart_in_each_sample():
    cu = torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 9).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_gradients_match_transformers():
    hf = random_hf_qwen2(seed=5, tie_word_embeddings=True)
    ours = ours_from_hf(hf).train()
    ids = torch.randint(0, hf.config.vocab_size, (29,), generator=torch.Generator().manual_seed(6))
    labels = ids.roll(-1).clone()
    labels[-1] = -100
    labels[:5] = -100
    hf_logits = hf(ids[None]).logits[0]
    torch.nn.functional.cross_entropy(hf_logits, labels, reduction="sum").backward()
    ours(ids, labels=labels).backward()
    from limo.model.weights import hf_name

    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, theirs[hf_name(name)].grad) < 1e-5, name


def test_loss_equals_cross_entropy_of_logits():
    hf = random_hf_qwen2(seed=7)
    ours = ours_from_hf(hf, dtype=torch.float64)
    ids = torch.randint(0, 203, (23,), generator=torch.Generator().manual_seed(8))
    labels = torch.where(torch.arange(23) % 3 == 0, -100, ids.roll(-1))
    with torch.no_grad():
        hidden = ours(ids)
        want = torch.nn.functional.cross_entropy(ours.logits(hidden), labels, reduction="sum")
        got = ours(ids, labels=labels)
    assert rel_err(got, want) < 1e-10


def test_meta_construction_allocates_nothing_and_materialises():
    model = build_model(PRESETS["qwen2.5-32b"], device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESETS["qwen2.5-32b"].num_params() == 32_763_876_352
    tiny = build_model(PRESETS["tiny"], device="meta")
    tiny.to_empty(device="cpu")
    tiny.tie_weights()
    init_weights(tiny)
    assert all(torch.isfinite(p).all() for p in tiny.parameters())
    assert tiny(torch.arange(10)).shape == (10, 128)


def test_tied_head_shares_the_embedding_after_to_empty():
    args = PRESETS["qwen2.5-0.5b"]
    model = build_model(ModelArgs(**{**args.__dict__, "num_layers": 1, "vocab_size": 64, "hidden_size": 56}), device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b"])
def test_presets_equal_the_released_configs(preset):
    cfg = json.loads(shared_path("data", "model_configs", f"{preset}-instruct.json").read_text())
    assert ModelArgs.from_hf(cfg) == PRESETS[preset]


def test_bad_architectures_are_named():
    cfg = random_hf_qwen2().config.to_dict()
    with pytest.raises(ArchitectureError, match=r"unknown architecture \(architectures=\['LlamaForCausalLM'\]"):
        ModelArgs.from_hf({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ArchitectureError, match="use_sliding_window"):
        ModelArgs.from_hf({**cfg, "use_sliding_window": True})
    with pytest.raises(ArchitectureError, match="rope scaling"):
        ModelArgs.from_hf({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None})
    with pytest.raises(ArchitectureError, match="not a multiple"):
        ModelArgs(vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="1-D packed stream"):
        build_model(PRESETS["tiny"], device="cpu")(torch.zeros(2, 3, dtype=torch.long))
