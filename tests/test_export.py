"""The export guard: weights holding a NaN or inf are never exported, and never evaluated."""

import pytest
import torch

from limo.engine.export import export_hf
from limo.model.qwen2 import PRESETS, build_model
from limo.model.weights import WeightsError, write_hf


def _tiny():
    """The tiny model with every weight drawn (build_model leaves the head's memory as it finds it)."""
    model = build_model(PRESETS["tiny"], device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    return model


def test_an_export_with_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path):
    model = _tiny()
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.norm.weight[0] = float("-inf")
    with pytest.raises(WeightsError, match=r"refusing to export .*/hf: 2 tensor\(s\) hold NaN or inf, first layers\.1\.mlp\.up_proj\.weight, norm\.weight"):
        export_hf(model, tmp_path / "hf", rank=0, dtype=torch.bfloat16)
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_an_evaluation_of_a_non_finite_export_is_refused_naming_the_tensor(tmp_path):
    from limo.eval.sampler import LLM

    model = _tiny()
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    write_hf(tmp_path / "hf", model.args, model.named_parameters(), dtype=torch.float32)  # below the guard: as an old export
    with pytest.raises(WeightsError, match=r"hf: model\.layers\.0\.self_attn\.q_proj\.weight holds NaN or inf; refusing to load"):
        LLM(tmp_path / "hf", dtype="float32", device="cpu")
