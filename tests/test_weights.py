"""HF weight I/O: transformers' folders in, folders transformers loads out, clear errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from limo.model.qwen2 import ArchitectureError
from limo.model.weights import HFCheckpoint, WeightsError, iter_state, load_pretrained, save_pretrained, write_hf
from tests.conftest import random_hf_qwen2, rel_err


def _logits(model_or_hf, ids, ours: bool):
    with torch.no_grad():
        return model_or_hf.logits(model_or_hf(ids)) if ours else model_or_hf(ids[None]).logits[0]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard_bytes", [None, 30_000])
def test_transformers_folder_in_and_ours_out(tmp_path, tied, shard_bytes):
    hf = random_hf_qwen2(seed=11, tie_word_embeddings=tied)
    kw = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    hf.save_pretrained(tmp_path / "theirs", **kw)
    ours = load_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 203, (31,), generator=torch.Generator().manual_seed(0))
    want = _logits(hf, ids, ours=False)
    assert rel_err(_logits(ours, ids, ours=True), want) < 1e-5

    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=shard_bytes or 5 * 2**30)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    if shard_bytes:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert files == ["config.json", "model.safetensors"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert torch.equal(_logits(back, ids, ours=False), want)


def test_slices_read_only_the_rows_asked_for(tmp_path):
    hf = random_hf_qwen2(seed=12)
    hf.save_pretrained(tmp_path)
    ckpt = HFCheckpoint(tmp_path)
    full = hf.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ckpt.read("layers.1.mlp.down_proj.weight", rows=slice(5, 17)), full[5:17])
    assert ckpt.read("lm_head.weight", dtype=torch.bfloat16).dtype == torch.bfloat16


def _saved(tmp_path):
    hf = random_hf_qwen2(seed=13)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    return load_file(tmp_path / "model.safetensors"), save_file


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    tensors, save_file = _saved(tmp_path)
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_pretrained(tmp_path)
    assert "missing tensors: model.layers.0.self_attn.k_proj.bias" in str(e.value)
    assert "unexpected tensors: model.layers.0.extra.weight" in str(e.value)


def test_wrong_shape_and_dtype_are_named(tmp_path):
    tensors, save_file = _saved(tmp_path)
    tensors["model.norm.weight"] = torch.ones(47)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_pretrained(tmp_path)
    assert "model.norm.weight in model.safetensors: shape [47], expected [48]" in str(e.value)
    assert "model.layers.1.mlp.up_proj.weight in model.safetensors: dtype I32" in str(e.value)


def test_truncated_file_and_bad_folders_are_named(tmp_path):
    _saved(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: unreadable safetensors file \(truncated or corrupt\?\)"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="config.json does not exist"):
        load_pretrained(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(ArchitectureError, match="config.json: unknown architecture"):
        load_pretrained(tmp_path)


def test_a_failed_save_leaves_the_previous_export_intact(tmp_path):
    hf = random_hf_qwen2(seed=14)
    ours = load_pretrained(_save(hf, tmp_path / "src"))
    dest = tmp_path / "export"
    save_pretrained(ours, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def dying():
        for i, item in enumerate(iter_state(ours)):
            if i == 5:
                raise OSError("disk full")
            yield item

    with pytest.raises(OSError, match="disk full"):
        write_hf(dest, ours.args, dying(), max_shard_bytes=10_000)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _save(hf, path):
    hf.save_pretrained(path)
    return path


def test_model_dirs_resolve_locally_and_bad_names_are_named(tmp_path):
    from limo.model.weights import resolve_model_dir

    assert resolve_model_dir(tmp_path) == tmp_path
    for bad in (str(tmp_path / "missing"), "a/b/c", "./relative"):
        with pytest.raises(WeightsError, match="is not a model folder"):
            resolve_model_dir(bad)


def test_export_holds_one_shard_at_a_time_and_keeps_the_generation_config(tmp_path):
    """Streaming a (gathered) model tensor by tensor: a written shard's tensors are released before
    the next shard fills, so rank 0 never holds the whole model; the base generation_config.json
    comes along."""
    hf = random_hf_qwen2(seed=15)
    ours = load_pretrained(_save(hf, tmp_path / "src"))
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [7, 3], "temperature": 0.7, "top_p": 0.8}))
    storages = []  # weak references to each tensor's storage, in the order they are streamed
    most_alive = 0

    def gathered():
        nonlocal most_alive
        for name, p in iter_state(ours):
            t = p.detach().clone()  # as a gather would: a fresh tensor only the writer holds
            storages.append(t.untyped_storage()._weak_ref())
            alive = sum(not torch.UntypedStorage._expired(ref) for ref in storages[:-1])
            most_alive = max(most_alive, alive)
            yield name, t
            del t

    write_hf(tmp_path / "out", ours.args, gathered(), dtype=torch.float32, max_shard_bytes=1, generation_config=gen)
    assert len(storages) == len(list(ours.parameters())) > 10
    assert most_alive == 1  # the one tensor of the shard not yet written
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == json.loads(gen.read_text())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.arange(17) % 203
    assert torch.equal(_logits(back, ids, ours=False), _logits(hf, ids, ours=False))
    assert back.generation_config.eos_token_id == [7, 3]
    for ref in storages:
        torch.UntypedStorage._free_weak_ref(ref)


@pytest.mark.parametrize("size", ["0.5b", "1.5b", "7b", "32b"])
def test_built_in_configs_equal_the_real_qwen25_configs(size):
    """The architectures planned offline are the ones in the models' own config.json files."""
    from limo.model.qwen2 import HUB_PRESETS, PRESETS, ModelArgs
    from tests.conftest import shared_path

    real = json.loads(shared_path("data", "model_configs", f"qwen2.5-{size}-instruct.json").read_text())
    assert PRESETS[f"qwen2.5-{size}"] == ModelArgs.from_hf(real)
    assert HUB_PRESETS[f"Qwen/Qwen2.5-{size.upper()}-Instruct"] == HUB_PRESETS[f"Qwen/Qwen2.5-{size.upper()}"] == f"qwen2.5-{size}"


def test_model_args_without_network_use_the_built_in_config_and_say_so(tmp_path, monkeypatch):
    """A known hub id resolves to its built-in config when neither the hub nor its cache answers;
    an unknown one is one line naming what to pass instead."""
    from limo.engine.config import load_config
    from limo.model.qwen2 import PRESETS
    from limo.model.weights import model_args
    from tests.conftest import ROOT

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    cfg = load_config(ROOT / "configs/limo_qwen2.5_32b_8xh100.toml")
    args, source = model_args(cfg)
    assert args == PRESETS["qwen2.5-32b"] and "built-in config of Qwen/Qwen2.5-32B-Instruct" in source
    cfg.model.path = "someone/unknown-model"
    with pytest.raises(WeightsError) as e:
        model_args(cfg)
    assert "someone/unknown-model" in str(e.value) and "--model.preset=" in str(e.value) and "\n" not in str(e.value)
    folder = tmp_path / "folder"
    random_hf_qwen2(seed=1).save_pretrained(folder)
    cfg.model.path = str(folder)
    assert model_args(cfg)[1] == str(folder / "config.json")
