"""The sampler's tensor parallelism (T ranks over gloo on CPU) and data-parallel replicas, and the
plan that sizes them: outputs equal to one sampler's, token for token; a dead worker or replica
named within a timeout; the 32B shards' bytes on the meta device equal to the plan's.

Each tensor-parallel LLM starts worker processes (spawn): ~5 s each on 2 cores, so the cases share
them. The torch kernels run on CPU here (KERNELS_BACKEND=torch, inherited by the workers); the
model is float32 so that no near-tie flips an argmax between T=1 and T=2 (their all-reduces sum in
another order)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

from limo.eval.generators import LLMGenerator, Request
from limo.eval.plan import LIMO_SUITE, kv_bytes_per_token, plan
from limo.eval.replicas import ReplicaDied, ReplicaGenerator
from limo.eval.sampler import LLM, SamplingParams
from limo.eval.sampler.parallel import ParallelismError, TPLayout, build_shard, load_shard, shard_bytes
from limo.eval.sampler.workers import WorkerDied
from limo.kernels import dispatch
from limo.model.qwen2 import PRESETS
from limo.model.weights import load_pretrained
from tests.conftest import random_hf_qwen2, shared_path

SIZES = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64)


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    saved = os.environ.get("KERNELS_BACKEND")
    os.environ["KERNELS_BACKEND"] = "torch"
    dispatch.set_backend()
    yield
    if saved is None:
        del os.environ["KERNELS_BACKEND"]
    else:
        os.environ["KERNELS_BACKEND"] = saved
    dispatch.set_backend()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-tp")
    random_hf_qwen2(seed=0, num_key_value_heads=2).save_pretrained(path)  # 6 heads on 2 KV heads, vocabulary 203 (odd)
    return path


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 203, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts([7, 13, 5, 21])
PARAMS = [SamplingParams(max_tokens=24), SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=5, n=3),
          SamplingParams(max_tokens=30), SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=2)]  # fmt: skip


def _run(llm):
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [(o.prompt_index, o.sample_index, o.token_ids, o.finish_reason) for o in outs], llm.scheduler.num_preemptions


def test_tensor_parallel_output_equals_one_rank_token_for_token_with_preemption_and_shared_prefixes(model_dir):
    # 14 pages of 4 tokens for 7 samples of up to 51 tokens: sequences are preempted and recomputed;
    # the n=3 and n=2 forks share their prompt's pages.
    want, preempted = _run(LLM(model_dir, num_blocks=14, **SIZES))
    assert preempted > 0
    with LLM(model_dir, num_blocks=14, tensor_parallel_size=2, **SIZES) as llm:
        got, tp_preempted = _run(llm)
        assert llm.runner.kv_cache.shape[-2] == 1  # each rank's cache holds its 1 of the 2 KV heads
    assert got == want and tp_preempted == preempted
    assert len({tuple(t) for p, _, t, _ in got if p == 1}) == 3  # seeded samples differ from each other, identically at T=2


def test_a_worker_killed_mid_run_is_named_within_a_timeout(model_dir):
    llm = LLM(model_dir, num_blocks=64, tensor_parallel_size=2, **SIZES)
    worker = llm._tp.workers[0]

    def kill_on_first(_output):
        os.kill(worker.pid, signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(WorkerDied, match=rf"worker rank 1 of 2 \(pid {worker.pid}\) died with exit code -9"):
        llm.generate(PROMPTS, [SamplingParams(max_tokens=5), *PARAMS[1:]], use_tqdm=False, on_finish=kill_on_first)
    assert time.monotonic() - start < 60
    llm.close()


def test_each_rank_holds_its_slices_of_the_full_weights(model_dir):
    full = load_pretrained(model_dir)
    layout = TPLayout(full.args, 1, 2)
    shard = load_shard(str(model_dir), layout, torch.float32, "cpu")
    q = full.layers[0].self_attn.q_proj
    assert torch.equal(shard.layers[0].self_attn.q_proj.weight, q.weight[3 * 8:6 * 8])  # heads 3-5 of 6, head_dim 8
    assert torch.equal(shard.layers[0].self_attn.q_proj.bias, q.bias[3 * 8:6 * 8])
    assert torch.equal(shard.layers[0].self_attn.k_proj.weight, full.layers[0].self_attn.k_proj.weight[8:16])  # KV head 1
    assert torch.equal(shard.layers[1].self_attn.o_proj.weight, full.layers[1].self_attn.o_proj.weight[:, 24:48])
    assert torch.equal(shard.layers[1].mlp.down_proj.weight, full.layers[1].mlp.down_proj.weight[:, 50:100])
    emb = shard.embed_tokens.weight
    assert emb.shape == (102, 48) and torch.equal(emb[:101], full.embed_tokens.weight[102:]) and not emb[101:].any()  # padded
    assert torch.equal(shard.norm.weight, full.norm.weight)


@pytest.mark.parametrize("preset, size, message", [
    ("qwen2.5-32b", 3, "num_attention_heads=40 is not a multiple of tensor_parallel_size=3"),
    ("qwen2.5-7b", 16, "num_attention_heads=28 is not a multiple of tensor_parallel_size=16"),
])
def test_a_size_the_shapes_do_not_divide_is_a_clear_error(preset, size, message):
    with pytest.raises(ParallelismError, match=message):
        TPLayout(PRESETS[preset], 0, size)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_the_32b_shard_on_meta_holds_the_plans_weight_and_kv_bytes(size):
    args = PRESETS["qwen2.5-32b"]
    shard = build_shard(TPLayout(args, size - 1, size), "meta", torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in shard.parameters())
    choice = next(c for c in plan(args, 8, {"aime24": LIMO_SUITE["aime24"]}, 32768) if c.tp == size)
    assert weights == shard_bytes(TPLayout(args, 0, size)) and abs(weights / 2**30 - choice.weights_gib) < 1e-9
    full = sum(p.numel() for p in build_shard(TPLayout(args, 0, 1), "meta", torch.bfloat16).parameters()) * 2
    assert abs(weights * size / full - 1) < 1e-3  # the shards add up to the model (norms repeat on every rank)
    a = shard.args  # what the runner sizes the paged cache by: this rank's KV heads
    page_bytes_per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2
    assert page_bytes_per_token == kv_bytes_per_token(TPLayout(args, 0, size)) == choice.kv_bytes_per_token == 262_144 // size


def test_the_plan_meets_the_issues_goal_on_paper_and_refuses_what_does_not_fit():
    choices = plan(PRESETS["qwen2.5-32b"], 8, LIMO_SUITE, 32768)
    one_gpu = plan(PRESETS["qwen2.5-32b"], 1, LIMO_SUITE, 32768)
    assert not one_gpu[0].fits and one_gpu[0].full_chains == 0  # today: 61 GiB of weights leave no room for a 32k chain
    best = min((c for c in choices if c.fits), key=lambda c: c.hours)
    assert best.tp > 1 and best.hours < 1.0


def test_data_parallel_replicas_give_one_samplers_outputs(model_dir):
    requests = [Request("system", f"question {i}", temperature=0.8 if i % 2 else 0.0, top_p=1.0, max_tokens=8, seed=100 + i)
                for i in range(5)]  # fmt: skip
    folder = _folder_with_tokenizer(model_dir)
    want = LLMGenerator(LLM(folder, num_blocks=64, **SIZES), use_tqdm=False)(requests)
    seen = []
    with ReplicaGenerator(str(folder), 2, num_blocks=64, **SIZES) as replicas:
        got = replicas(requests, on_done=lambda i, c: seen.append(i))
    assert got == want and sorted(seen) == list(range(5))


def _folder_with_tokenizer(model_dir):
    """A tiny random model with the Qwen2.5 vocabulary and tokenizer (the replicas render chats)."""
    folder = model_dir.parent / "tiny-tp-tok"
    if not folder.exists():
        random_hf_qwen2(seed=0, num_key_value_heads=2, vocab_size=151936).save_pretrained(folder)
        for f in shared_path("data", "tokenizers", "qwen2.5").iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def test_a_replica_that_dies_is_named(model_dir):
    folder = _folder_with_tokenizer(model_dir)
    replicas = ReplicaGenerator(str(folder), 2, num_blocks=64, **SIZES)
    replicas.procs[1].kill()
    requests = [Request("s", "q", 0.0, 1.0, 4, 0), Request("s", "q2", 0.0, 1.0, 4, 1)]
    with pytest.raises(ReplicaDied, match=r"data-parallel replica 1 of 2 \(pid \d+, CPU\) died with exit code -9"):
        replicas(requests)


def test_eval_run_with_replicas_and_tensor_parallelism_writes_one_samplers_results_and_resumes(model_dir, tmp_path, capsys):
    from limo.eval.results import load_results
    from limo.eval.run import main

    folder = _folder_with_tokenizer(model_dir)
    base = ["--model", str(folder), "--benchmarks", "aime24", "--limit", "2", "--samples", "3", "--max-tokens", "6",
            "--device", "cpu", "--dtype", "float32", "--data", str(shared_path("data", "eval")), "--kv-cache-gib", "0.01"]  # fmt: skip
    runs = {}
    for layout in (("1", "1"), ("2", "2")):
        out = tmp_path / f"tp{layout[0]}-dp{layout[1]}"
        assert main([*base, "--tp", layout[0], "--dp", layout[1], "--out", str(out)]) == 0
        runs[layout] = {k: (r.output, r.num_tokens) for k, r in load_results(out / "aime24.jsonl").items()}
    assert "tensor parallelism 2 x 2 data-parallel replicas (as asked)" in capsys.readouterr().out
    assert len(runs[("1", "1")]) == 6 and runs[("2", "2")] == runs[("1", "1")]
    assert main([*base, "--tp", "2", "--dp", "2", "--out", str(tmp_path / "tp2-dp2")]) == 0  # resumes: nothing left to generate
    assert "0 to generate" in capsys.readouterr().out


def test_eval_run_plan_prints_the_table_and_bad_layouts_are_one_line(model_dir, capsys):
    from limo.eval.run import main

    folder = _folder_with_tokenizer(model_dir)
    base = ["--model", str(folder), "--benchmarks", "aime24,math500", "--device", "cpu", "--data", str(shared_path("data", "eval"))]
    assert main([*base, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "2 benchmarks, 980 samples" in out and "<- best" in out and "assumptions" in out
    assert main([*base, "--tp", "two"]) == 2
    assert "error: --tp two: a count >= 1, or auto" in capsys.readouterr().err
