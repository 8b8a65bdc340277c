"""The sampler measured without a GPU: its host side, and the CPU path's decode time by context.

    python -m benchmarks.bench_sampler --host [--batches 1,64,256] [--out FILE]
    python -m benchmarks.bench_sampler --contexts [256,1024,4096] [--out FILE]

--host: the CPU time of everything a decode step does but the model's forward: scheduling, block
tables, slot mappings, sampling inputs, stop checks, output bookkeeping. The model is `NullModel`
(no layers; fixed logits over a small vocabulary), so what is left is the host's work, which on a
GPU must hide behind the device's. Each batch size B runs B / 16 prompts of 16 samples each (one
prompt of one sample at B = 1), prefix sharing on, with a KV budget of 60% of what the samples
need, so sequences are preempted and recomputed as in a full cache. Reported per decode step and
per sequence, with the sampler's own tensor math (the Gumbel noise and argmax over [B, V], GPU
work on a GPU) measured apart. Goal: <= 1 ms per step at B = 256, under 5% of a 32B decode step
on an H100 (~20 ms: 64 GB of bf16 weights at ~3.3 TB/s).

--contexts: the CPU time per decode step of the demo's tiny model at batch 64 with prompts of each
context length, one thread (thread CPU time: steady on a loaded machine), split into the paged
attention and the rest of the forward.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.harness import python_unit
from limo.model.init import init_weights
from limo.model.qwen2 import ModelArgs

HOST_GOAL_US_AT_256 = 1000.0
SAMPLES_PER_PROMPT = 16
PROMPT_TOKENS, NEW_TOKENS, NULL_VOCAB = 128, 96, 256


class NullModel(torch.nn.Module):
    """The sampler's view of a model, with no layers: the same logits for every row."""

    def __init__(self, vocab_size: int = NULL_VOCAB, device: str = "cpu"):
        super().__init__()
        self.args = ModelArgs(vocab_size=vocab_size, hidden_size=2, intermediate_size=2, num_layers=1, num_heads=1, num_kv_heads=1)
        self.embed_tokens = torch.nn.Embedding(1, 1, device=device)  # where the sampler reads device and dtype
        self.fixed = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0)).to(device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1, device=input_ids.device)  # [T, 1]: no attention, no K/V stored

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fixed.expand(hidden.shape[0], -1)  # [n, V]


def _timed(obj: object, name: str, into: list[float], clock: Callable[[], float]) -> None:
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = clock()
        out = real(*args, **kwargs)
        into.append(clock() - start)
        return out

    setattr(obj, name, wrapper)


def _null_worker(rank: int, size: int, init_file: str) -> None:
    """A tensor-parallel worker's host side: receive every step's inputs; the model is null."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    from limo.eval.sampler.workers import recv_step

    while recv_step(dist.group.WORLD) is not None:
        pass
    dist.destroy_process_group()


class _NullGroup:
    """Rank 0 of a gloo group of `size` whose other ranks only receive the steps (_null_worker):
    what tensor parallelism adds to rank 0's host work, the broadcast of each step's inputs."""

    def __init__(self, size: int):
        import tempfile

        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.dir = tempfile.mkdtemp(prefix="limo-host-")
        init = f"{self.dir}/rendezvous"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_null_worker, args=(r, size, init), daemon=True) for r in range(1, size)]
        for p in self.procs:
            p.start()
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=size)

    def broadcast(self, step) -> None:
        import torch.distributed as dist

        from limo.eval.sampler.workers import send_step

        send_step(step, dist.group.WORLD)

    def close(self) -> None:
        import shutil

        import torch.distributed as dist

        from limo.eval.sampler.workers import send_step

        send_step(None, dist.group.WORLD)
        for p in self.procs:
            p.join(timeout=30)
        dist.destroy_process_group()
        shutil.rmtree(self.dir, ignore_errors=True)


def host_step(batch: int, tp: int = 1) -> dict:
    """Host microseconds per decode step (and per sequence) at `batch` running sequences; at
    `tp` > 1 with each step broadcast to tp - 1 null workers, as rank 0 of a tensor-parallel sampler does."""
    from limo.eval.sampler import LLM, SamplingParams

    n = SAMPLES_PER_PROMPT if batch >= SAMPLES_PER_PROMPT else 1
    prompts = batch // n
    pages_needed = prompts * (-(-PROMPT_TOKENS // 16) + n * -(-NEW_TOKENS // 16))
    llm = LLM.from_model(NullModel(), num_blocks=max(int(0.6 * pages_needed), -(-(PROMPT_TOKENS + NEW_TOKENS) // 16)),
                         max_num_seqs=batch, max_model_len=PROMPT_TOKENS + NEW_TOKENS, cuda_graphs=False)  # fmt: skip
    steps: list[tuple[float, int, int]] = []
    sampler: list[float] = []
    clock = time.thread_time  # this thread's CPU time, one torch thread: steady on a busy machine
    _timed(llm.runner, "sampler", sampler, clock)
    real_schedule, real_post = llm.scheduler.schedule, llm.scheduler.postprocess
    state: dict = {}

    def schedule():
        state["start"] = clock()
        state["batch"] = real_schedule()
        return state["batch"]

    units: list[float] = []

    def postprocess(b, token_ids):
        out = real_post(b, token_ids)
        if not b.is_prefill:
            steps.append((clock() - state["start"], len(b.seqs), len(sampler)))
            units.append(python_unit(clock))  # outside the step's window: the next schedule() restarts it
        return out

    llm.scheduler.schedule, llm.scheduler.postprocess = schedule, postprocess
    group = _NullGroup(tp) if tp > 1 else None
    sends: list[float] = []
    if group is not None:
        llm.runner.broadcast = group.broadcast
        _timed(llm.runner, "broadcast", sends, clock)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, NULL_VOCAB, (prompts, PROMPT_TOKENS), generator=g).tolist()
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, n=n, seed=0, ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm.generate(ids, params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
        if group is not None:
            group.close()
    # Steady state: the steps whose batch is full (the ramp-up and the draining tail are shorter).
    full = [(t, i) for t, b, i in steps if b == batch] or [(t, i) for t, b, i in steps]
    # Each step's own host time (the step less its sampler math), then the median: the math's noise
    # does not add to the host's as it would in a difference of two medians.
    host_us = statistics.median(t - sampler[i - 1] for t, i in full) * 1e6
    math_s = statistics.median(sampler[i - 1] for _, i in full)
    send_us = statistics.median(sends[i - 1] for _, i in full) * 1e6 if sends else 0.0  # the full-batch decode steps' broadcasts
    unit_us = statistics.median(units) * 1e6
    return {"batch": batch, "tp": tp, "samples_per_prompt": n, "decode_steps": len(steps), "preemptions": llm.scheduler.num_preemptions,
            "host_us_per_step": host_us, "python_unit_us": unit_us, "host_units_per_step": host_us / unit_us,
            "broadcast_us_per_step": send_us, "host_us_per_sequence": host_us / batch, "sampler_math_us_per_step": math_s * 1e6,
            "goal_us_per_step": HOST_GOAL_US_AT_256 if batch == 256 else None}  # fmt: skip


def context_steps(contexts: list[int], batch: int = 64, new_tokens: int = 9) -> list[dict]:
    """CPU milliseconds per decode step of the tiny preset at each context (one thread), and of
    those, the paged attention's: its layers' calls timed alone on a step's shapes."""
    import tempfile
    from pathlib import Path

    from limo.eval.sampler import LLM, SamplingParams
    from limo.eval.sampler.scheduler import WATERMARK
    from limo.kernels.paged_attention import paged_attention
    from limo.model.qwen2 import PRESETS, build_model
    from limo.model.weights import save_pretrained

    args = PRESETS["tiny"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            model = build_model(args, device="cpu")
            init_weights(model)
            save_pretrained(model, Path(tmp), dtype=torch.float32)
            longest = max(contexts) + new_tokens + 16
            pages = batch * -(-longest // 16)  # every sequence's pages at once, and the scheduler's watermark above them
            llm = LLM(tmp, dtype="float32", device="cpu", num_blocks=int(pages / (1 - WATERMARK)) + batch, max_num_seqs=batch,
                      max_model_len=longest)  # fmt: skip
        decode, forward = llm.runner.decode, []

        def timed_decode(last_ids, lens, rows):  # a step's time, if the whole batch ran in it
            start = time.thread_time()
            out = decode(last_ids, lens, rows)
            if len(lens) == batch:
                forward.append(time.thread_time() - start)
            return out

        llm.runner.decode = timed_decode
        rows = []
        for context in contexts:
            forward.clear()
            ids = torch.randint(0, args.vocab_size, (batch, context), generator=torch.Generator().manual_seed(context)).tolist()
            llm.generate(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
            if not forward:
                raise RuntimeError(f"no decode step at context {context} ran all {batch} sequences at once")
            k_cache, v_cache = llm.runner.kv_cache[0, 0], llm.runner.kv_cache[1, 0]
            pages = -(-context // 16)
            tables = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages) % k_cache.shape[0]
            lens = torch.full((batch,), context, dtype=torch.int32)
            q = torch.randn(batch, args.num_heads, args.head_dim)
            start = time.thread_time()
            for _ in range(args.num_layers):
                paged_attention(q, k_cache, v_cache, tables, lens, context)
            rows.append({"context": context, "batch": batch, "ms_per_step": 1e3 * statistics.median(forward),
                         "attention_ms_per_step": 1e3 * (time.thread_time() - start)})  # fmt: skip
        return rows
    finally:
        torch.set_num_threads(threads)


def main(args) -> int:
    """bench_sampler.py's --host / --contexts: print a table, write JSON when asked."""
    import json
    import sys

    from benchmarks.harness import environment

    device = torch.device("cpu")
    if args.host:
        rows = [host_step(b, tp) for tp in args.host_tp for b in args.host_batches]
        for r in rows:
            print(f"T={r['tp']} batch {r['batch']:>3} ({r['samples_per_prompt']} per prompt, {r['preemptions']} preemptions): host "
                  f"{r['host_us_per_step']:8.0f} us per step, {r['host_us_per_sequence']:6.2f} us per sequence; sampler math "
                  f"{r['sampler_math_us_per_step']:7.0f} us" + (f"  (goal <= {r['goal_us_per_step']:.0f} us)" if r["goal_us_per_step"] else ""))
    else:
        rows = context_steps(args.contexts)
        for r in rows:
            print(f"context {r['context']:>6}: {r['ms_per_step']:8.1f} ms per decode step at batch {r['batch']} "
                  f"({1024 * r['ms_per_step'] / r['context']:5.1f} ms per 1k tokens of context; "
                  f"{r['attention_ms_per_step']:.1f} ms of it paged attention)")
    if args.host and len(args.host_tp) > 1:
        for b in args.host_batches:
            one, *rest = [r for r in rows if r["batch"] == b]
            for r in rest:
                # What T adds to rank 0 is the step's broadcast, timed inside the run; the two runs' totals
                # also differ by this machine's noise (another process shares its 2 cores), printed beside.
                r["vs_tp1"] = (one["host_us_per_step"] + r["broadcast_us_per_step"]) / one["host_us_per_step"]
                r["vs_tp1_runs"] = r["host_us_per_step"] / one["host_us_per_step"]
                goal = "  (goal <= 1.3x at batch 256)" if b == 256 else ""
                print(f"batch {b:>3}: T={r['tp']} adds {r['broadcast_us_per_step']:.0f} us of broadcast per step to rank 0: "
                      f"{r['vs_tp1']:.2f}x T=1's host work{goal} (the two runs' totals: {r['vs_tp1_runs']:.2f}x)")
    if args.out:
        payload = {"bench": "sampler_host" if args.host else "sampler_contexts", "environment": environment(device), "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
