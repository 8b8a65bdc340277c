"""DataConfig -> encoded samples: the cutoff (drop or truncate, always counted), the report, tokenizers."""

import json

import pytest
import torch

from limo.data import synthetic
from limo.data.chat import IGNORE, encode
from limo.data.dataset import EncodedSample, load_samples, resolve_tokenizer
from limo.data.sources import DataError
from limo.engine.config import DataConfig


def _write(path, solutions):
    with path.open("w") as f:
        for i, s in enumerate(solutions):
            f.write(json.dumps({"question": f"Question {i}?", "solution": s, "answer": str(i)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.byte_tokenizer()


def test_synthetic_default_loads_the_demo_set(tokenizer):
    cfg = DataConfig(path="synthetic", synthetic_samples=50, max_tokens=512, tokens_per_microbatch=2048)
    samples, report = load_samples(cfg, tokenizer)
    records = synthetic.train_split(50)
    assert len(samples) == report.samples == report.records == 50
    for i, (s, r) in enumerate(zip(samples, records)):
        ids, labels = encode([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["solution"]}], tokenizer)
        assert s.input_ids.tolist() == ids and s.labels.tolist() == labels and s.index == i and s.where == f"synthetic[{i}]"
        assert s.input_ids.dtype == s.labels.dtype == torch.int32
        assert s.num_label_tokens == sum(label != IGNORE for label in labels[1:])
    assert report.tokens == sum(len(s) for s in samples) and report.label_tokens == sum(s.num_label_tokens for s in samples)
    assert report.max_token_id < len(tokenizer)


def test_overlong_samples_are_dropped_and_counted(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", ["short", "x" * 300, "also short", "y" * 500])
    samples, report = load_samples(DataConfig(path=path, max_tokens=200, overlong="drop", tokens_per_microbatch=200), tokenizer)
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:3"] and [s.index for s in samples] == [0, 1]
    assert (report.records, report.overlong, report.dropped, report.truncated, report.samples) == (4, 2, 2, 0, 2)
    assert "2 over the cutoff (0 truncated, 2 dropped)" in report.summary()


def test_overlong_samples_are_truncated_and_counted(tmp_path, tokenizer):
    path = _write(tmp_path / "t.jsonl", ["short", "x" * 300])
    cfg = DataConfig(path=path, max_tokens=200, overlong="truncate", tokens_per_microbatch=200)
    samples, report = load_samples(cfg, tokenizer)
    assert (report.overlong, report.truncated, report.dropped) == (1, 1, 0)
    full_ids, full_labels = encode([{"role": "user", "content": "Question 1?"}, {"role": "assistant", "content": "x" * 300}], tokenizer)
    assert samples[1].truncated and not samples[0].truncated
    assert samples[1].input_ids.tolist() == full_ids[:200] and samples[1].labels.tolist() == full_labels[:200]
    assert report.max_len == 200


def test_truncation_that_leaves_nothing_supervised_drops_the_sample(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", ["fine"])
    with open(path, "a") as f:
        f.write(json.dumps({"question": "q" * 400, "solution": "s", "answer": "1"}) + "\n")
    samples, report = load_samples(DataConfig(path=path, max_tokens=200, overlong="truncate", tokens_per_microbatch=200), tokenizer)
    assert len(samples) == 1 and (report.overlong, report.truncated, report.dropped) == (1, 1, 1)


def test_all_dropped_is_an_error_and_duplicates_are_counted(tmp_path, tokenizer):
    path = _write(tmp_path / "a.jsonl", ["z" * 500, "z" * 500])
    with pytest.raises(DataError, match="no usable samples"):
        load_samples(DataConfig(path=path, max_tokens=100, tokens_per_microbatch=100), tokenizer)
    path = _write(tmp_path / "dup.jsonl", ["same", "other"])
    with open(path, "a") as f:
        f.write(json.dumps({"question": "Question 0?", "solution": "same", "answer": "0"}) + "\n")
    _, report = load_samples(DataConfig(path=path), tokenizer)
    assert report.duplicates == 1 and report.samples == 3


def test_system_prompt_reaches_the_encoding(tmp_path, tokenizer):
    path = _write(tmp_path / "s.jsonl", ["ok"])
    samples, _ = load_samples(DataConfig(path=path, system_prompt="Be exact."), tokenizer)
    assert tokenizer.decode(samples[0].input_ids.tolist()).startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")


def test_encoded_sample_contract():
    with pytest.raises(DataError, match="x.jsonl:4: input_ids \\(3,\\) and labels \\(2,\\)"):
        EncodedSample(torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 0, "x.jsonl:4")


def test_resolve_tokenizer(tmp_path):
    assert len(resolve_tokenizer(DataConfig(path="synthetic"))) == 260
    with pytest.raises(DataError, match="data.path='data/limo.jsonl' needs a tokenizer: set data.tokenizer"):
        resolve_tokenizer(DataConfig(path="data/limo.jsonl"))
    with pytest.raises(DataError, match=f"no tokenizer in {tmp_path}: looked for tokenizer.json, .*; name a folder that has one with --data.tokenizer=DIR"):
        resolve_tokenizer(DataConfig(path="synthetic", tokenizer=str(tmp_path)))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=f"data.tokenizer='{tmp_path}': cannot load a tokenizer"):
        resolve_tokenizer(DataConfig(path="synthetic", tokenizer=str(tmp_path)))
    with pytest.raises(DataError, match=f"model.path='{tmp_path / 'missing'}' is not a folder"):
        resolve_tokenizer(DataConfig(path="x.jsonl"), model_path=str(tmp_path / "missing"))
    synthetic.byte_tokenizer().save_pretrained(str(tmp_path / "model"))
    assert resolve_tokenizer(DataConfig(path="x.jsonl"), model_path=str(tmp_path / "model")).eos_token == "<|im_end|>"
