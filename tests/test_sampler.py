"""LLM.generate end to end on random tiny models saved as HF folders: transformers parity, seeds, stops.

The tests marked "Triton" forbid the torch references, so the paged kernels demonstrably ran
(compiled, with CUDA graphs, on a GPU; in Triton's interpreter on CPU). On CPU the others run on
the references, which tests/test_paged_attention.py holds the kernels to, to stay within the CI
budget; on a GPU they run the kernels too. The model runs in float32 so that near-ties cannot
flip an argmax between us and transformers.
"""

import importlib
import json
import shutil

import pytest
import torch

from limo.eval.sampler import LLM, Output, SamplingParams
from limo.eval.sampler.block_manager import BlockManager
from limo.eval.sampler.sequence import Sequence
from limo.kernels import reference
from tests.conftest import random_hf_qwen2, rel_err, shared_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = dict(num_key_value_heads=1)  # 6 query heads on 1 KV head: grouped-query attention, and few interpreter programs
paged_attention = importlib.import_module("limo.kernels.paged_attention")  # the module, even if kernels re-exports a function of that name


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_qwen2(seed=0, **MODEL)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture
def triton_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a torch reference ran where the Triton kernel should have")

    monkeypatch.setattr(reference, "paged_attention", forbidden)
    monkeypatch.setattr(reference, "store_kv", forbidden)


@pytest.fixture
def fast_kernels(monkeypatch):
    """The torch references on CPU, where the interpreter is slow; the Triton kernels on a GPU."""
    if DEVICE == "cpu":
        monkeypatch.setattr(paged_attention, "_use_triton", lambda t: False)


def make_llm(path, **kwargs):
    return LLM(path, dtype="float32", device=DEVICE, **kwargs)


def _prompts(lengths, vocab=203, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompt, max_new_tokens):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_with_preemption_and_forks(hf_model, model_dir, triton_only):
    """Triton. Pages of 4 tokens, a cache too small for all requests at once: sequences get preempted and recomputed."""
    prompts = _prompts([1, 6, 17, 9, 12])
    params = [SamplingParams(max_tokens=7, n=2 if i == 3 else 1) for i in range(5)]
    llm = make_llm(model_dir, block_size=4, num_blocks=9, max_num_seqs=5, max_model_len=32)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0 and llm.block_manager.all_free()
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (4, 0)]
    for o in outs:
        assert o.token_ids == _hf_greedy(hf_model, prompts[o.prompt_index], 7), o
        assert o.finish_reason == "length" and o.text is None and o.prompt_token_ids == prompts[o.prompt_index]


def test_a_sample_that_reaches_max_model_len_ends_there(hf_model, model_dir):
    """As in vLLM: prompt + max_tokens past max_model_len is not an error; the context ends the sample."""
    prompt = _prompts([20])[0]
    llm = make_llm(model_dir, block_size=4, num_blocks=16, max_model_len=32)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=100), use_tqdm=False)
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.token_ids == _hf_greedy(hf_model, prompt, 12) and llm.block_manager.all_free()


def test_paged_decode_logits_match_dense_forward(hf_model, model_dir, triton_only):
    """Triton. Prefill two prompts into shuffled pages, decode five steps; every step's logits equal transformers' dense ones."""
    llm = make_llm(model_dir, block_size=4, num_blocks=12, max_num_seqs=2, max_model_len=32)
    bm, runner = llm.block_manager, llm.runner
    bm.free_blocks.rotate(5)  # pages out of order
    seqs = [Sequence(p, SamplingParams(), 0, i) for i, p in enumerate(_prompts([7, 13], seed=2))]
    for row, s in enumerate(seqs):
        s.table_row = 1 - row  # table rows need not follow the batch order
        bm.allocate(s)
    cu = [0, seqs[0].num_tokens, seqs[0].num_tokens + seqs[1].num_tokens]
    logits = runner.prefill([t for s in seqs for t in s.token_ids], [p for s in seqs for p in range(s.num_tokens)],
                            [runner._slot(s, p) for s in seqs for p in range(s.num_tokens)], cu)  # fmt: skip
    for step in range(5):
        with torch.no_grad():
            want = torch.stack([hf_model(torch.tensor([s.token_ids])).logits[0, -1] for s in seqs])
        assert rel_err(logits.cpu(), want) < 1e-5, step
        for s, t in zip(seqs, logits.argmax(-1).tolist()):
            s.token_ids.append(t)
            bm.append_slot(s)
        runner.apply_table_updates(bm.drain_table_updates())  # what the scheduler's batch carries
        logits = runner.decode([s.token_ids[-1] for s in seqs], [s.num_tokens for s in seqs], [s.table_row for s in seqs])


def test_seeded_sample_is_independent_of_the_batch(model_dir, fast_kernels):
    llm = make_llm(model_dir, num_blocks=40, max_num_seqs=8, max_model_len=64)
    target = _prompts([11], seed=3)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=1234, n=3)
    alone = llm.generate([target], params, use_tqdm=False)
    others = _prompts([5, 20], seed=4)
    mixed = llm.generate([others[0], target, others[1]], [SamplingParams(temperature=1.0, max_tokens=9), params,
                                                          SamplingParams(max_tokens=15, seed=9, n=2)], use_tqdm=False)  # fmt: skip
    assert [o.token_ids for o in mixed[1:4]] == [o.token_ids for o in alone]
    assert [(o.prompt_index, o.sample_index) for o in mixed] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert len({tuple(o.token_ids) for o in alone}) == 3  # the n samples differ from each other
    reseeded = llm.generate([target], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=1235), use_tqdm=False)
    assert reseeded[0].token_ids != alone[0].token_ids


def test_seeded_samples_survive_preemption(model_dir, fast_kernels):
    prompts = _prompts([3, 14, 8, 10], seed=5)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=77, n=2)
    roomy = make_llm(model_dir, block_size=4, num_blocks=64, max_model_len=32).generate(prompts, params, use_tqdm=False)
    tight_llm = make_llm(model_dir, block_size=4, num_blocks=8, max_model_len=32)
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_top_k_one_equals_greedy(model_dir, fast_kernels, capsys):
    llm = make_llm(model_dir, num_blocks=32, max_model_len=64)
    prompts = _prompts([4, 19, 9], seed=6)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10))
    assert "Generating" in capsys.readouterr().err  # the progress bar
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, seed=3), use_tqdm=False)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_eos_ends_a_sample_unless_ignored(hf_model, model_dir, tmp_path, fast_kernels):
    prompt = _prompts([8], seed=7)[0]
    free_run = _hf_greedy(hf_model, prompt, 12)
    eos = free_run[5]
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(model_dir / name, tmp_path / name)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos, 100_000]}))
    llm = make_llm(tmp_path, num_blocks=16, max_model_len=32)
    assert eos in llm.eos_token_ids
    stopped, ignored = llm.generate([prompt, prompt], [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, ignore_eos=True)],
                                    use_tqdm=False)  # fmt: skip
    cut = free_run.index(eos) + 1
    assert stopped.token_ids == free_run[:cut] and stopped.finish_reason == "stop"
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"


@pytest.fixture(scope="module")
def qwen_tokenizer_dir(model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    for f in model_dir.iterdir():
        shutil.copy(f, path / f.name)
    AutoTokenizer.from_pretrained(str(shared_path("data", "tokenizers", "qwen2.5"))).save_pretrained(path)
    return path


def test_string_prompts_text_and_stop_strings(hf_model, qwen_tokenizer_dir, fast_kernels):
    llm = make_llm(qwen_tokenizer_dir, num_blocks=32, max_model_len=64)
    prompt = "A?B?C?D?7!7!"  # one token per character, all inside the tiny model's 203-token vocabulary
    ids = llm.tokenizer(prompt, add_special_tokens=False).input_ids
    assert max(ids) < 203
    free = llm.generate([prompt], SamplingParams(max_tokens=24), use_tqdm=False)[0]
    assert free.token_ids == _hf_greedy(hf_model, ids, 24) and free.text == llm.tokenizer.decode(free.token_ids)
    text = free.text
    start = next(i for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]  # two whole characters mid-answer (here two 3-byte ones: a stop spanning many tokens)
    cut = llm.generate([prompt], SamplingParams(max_tokens=24, stop=("never-there", stop)), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 24
    assert stop in llm.tokenizer.decode(cut.token_ids) and stop not in llm.tokenizer.decode(cut.token_ids[:-1])


def test_bad_requests_are_clear_errors(model_dir):
    llm = make_llm(model_dir, block_size=4, num_blocks=6, max_num_seqs=4, max_model_len=32)
    cases = [
        ([[1] * 32], SamplingParams(max_tokens=1), "32 prompt tokens leave no room to generate within max_model_len=32"),
        ([[1] * 20], SamplingParams(max_tokens=6), "need 7 pages of 4 tokens; the cache has 6"),
        ([[1, 2]], SamplingParams(n=5), "n=5 samples exceed max_num_seqs=4"),
        ([[1, 203]], SamplingParams(), r"token id 203 is not an int in \[0, 203\)"),
        ([[]], SamplingParams(), "prompt 0 is empty"),
        (["hello"], SamplingParams(), "no tokenizer"),
        ([[1]], SamplingParams(stop="x"), "stop strings need a tokenizer"),
        ([[1], [2]], [SamplingParams()], "1 SamplingParams for 2 prompts"),
    ]
    for prompts, params, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, params, use_tqdm=False)
    assert llm.block_manager.all_free() and llm.scheduler.done
    with pytest.raises(ValueError, match=r"max_model_len=99999 exceeds the model's max_position_embeddings=\d+"):
        make_llm(model_dir, max_model_len=99999)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        LLM(model_dir, dtype="fp8")
    with pytest.raises(ValueError, match="num_blocks=0 must be an int >= 1"):
        make_llm(model_dir, num_blocks=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=16 < max_model_len=32"):
        make_llm(model_dir, max_model_len=32, max_num_batched_tokens=16)
    assert llm.generate([], SamplingParams(), use_tqdm=False) == [] and Output.__dataclass_fields__.keys() >= {"token_ids", "text"}


def test_default_cache_size_comes_from_memory(model_dir):
    llm = make_llm(model_dir, max_num_seqs=3, max_model_len=40, block_size=8)
    assert llm.runner.num_blocks == 3 * 5  # capped at what 3 full-length sequences can use
    assert isinstance(llm.block_manager, BlockManager) and llm.block_manager.num_blocks == 15
