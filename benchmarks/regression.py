"""The CI regression profile: deterministic figures measured on CPU, held against a baseline.

    python -m benchmarks.regression [--out FILE]      # measure, print, write JSON
    make bench-ci                                     # measure, then benchmarks/compare.py vs the baseline

Timings on a shared 2-core CI machine are noise; these figures are not. Each is a property of
the code that a careless change moves:
  dense_flops_ratio          matmul FLOPs of a training step (torch.utils.flop_counter) over the
                             analytic 6 x non-embedding params x tokens (biases and norms make it < 1)
  attention_flops_ratio      attention FLOPs counted over the causal formula; the counter charges
                             the masked half of each sample, and the CPU flash kernel's backward
                             recomputes the scores (7 matmuls for 6), so 2 x 7/6 = 2.33 means
                             "per sample, causal"
  saved_bytes_per_token_layer_{none,full}  bytes one layer keeps alive for backward per token
                             (bf16, attention as flash-attn keeps it), without and with checkpointing
  planner_activation_error   |measured - engine.memory's model| / measured, without checkpointing
  logits_peak_fraction       the fused cross-entropy's largest live [*, V] bytes over full logits,
                             forward + backward, with the chunk budget forcing 8 chunks
  sampler_host_units_per_step_b256  the sampler's host work per decode step at batch 256 (scheduling,
                             block tables, slots, sampling inputs, stop checks: everything but the
                             forward, with a null model; benchmarks/bench_sampler_cpu.py), this
                             thread's CPU time, over a fixed piece of plain Python timed between the
                             steps (python_unit, ~0.52 ms here): a slower or busier machine moves both.
                             Baseline: the goal, 1 ms, in this machine's units (1.9); it fails past
                             2.85, which O(context) work per step would cross. Measured 1.56-1.68
                             (808-880 us). sampler_host_us_per_step_b256, the same in us, is reported beside it
  limo_32b_simulated_peak_gib  the LIMO 32B recipe's step on 8 ranks, simulated at full size
                             (limo/engine/simulate.py: two full 16k micro-batches, fake tensors), GiB per rank
  limo_32b_planner_error     |the planner's tensors / the simulated peak - 1|: the goal is <= 5%
  limo_32b_planned_total_gib the planner's whole figure (allocator, prefetch in flight included):
                             must stay within the 77.1 GiB an 80 GB H100 leaves usable
  host_syncs_per_step        scalar reads (.item(), bool(t), .tolist()) in one FSDP training step on
                             two micro-batches on CPU, outside limo/kernels/reference.py (CPU-only); the
                             JSON lists each site. Expected: the step's one read of (loss, grad
                             norm), plus the fused CE's target-range check, which runs on CPU only
  curate_20k_dedup_decontaminate_s  wall seconds of `python -m limo.curate --steps dedup,decontaminate`
                             on benchmarks/bench_curate.py's seeded 20,000-record pool: the goal,
                             at most 2 minutes on 2 cores (measured ~14 s)
  grading_units_per_verdict  eval.grading.grade over the 2,845 real outputs of ../shared, warm
                             workers, 2 threads: wall time per verdict over python_unit (timed on the
                             wall clock before and after grading). Measured 0.9-1.5 here (1,050-2,100
                             verdicts/s); fails past 3, which the grader before its cheap checks and
                             screen (~200 verdicts/s, ~9 units) is far beyond. It replaced a floor of
                             1,000 verdicts/s, which a slower CI machine failed at 920 with the code
                             unchanged. grading_verdicts_per_s is reported beside it
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from limo import kernels  # noqa: E402
import limo.kernels.cross_entropy as ce  # noqa: E402
from benchmarks.bench_curate import grading_speed, time_curation  # noqa: E402
from benchmarks.bench_sampler_cpu import host_step  # noqa: E402
from benchmarks.harness import LIMO_RECIPE  # noqa: E402
from benchmarks.live_bytes import LiveBytes  # noqa: E402
from limo.data.dataset import EncodedSample  # noqa: E402
from limo.data.packing import build_step  # noqa: E402
from limo.engine.config import load_config  # noqa: E402
from limo.engine.distributed import init_distributed  # noqa: E402
from limo.engine.memory import layer_activation_bytes_per_token  # noqa: E402
from limo.engine.simulate import simulate  # noqa: E402
from limo.engine.train import build_training, train_step  # noqa: E402
from limo.model.flops import step_flops  # noqa: E402
from limo.model.init import init_weights  # noqa: E402
from limo.model.qwen2 import PRESETS, ModelArgs, VarlenContext, build_model, rotary_cos_sin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [100, 37, 200, 175]  # one packed micro-batch of four samples
ARGS = ModelArgs(vocab_size=1003, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2)


def _packed(args: ModelArgs, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    ids = torch.randint(0, args.vocab_size, (sum(lengths),), generator=g)
    labels = ids.roll(-1)
    labels[cu[1:].long() - 1] = -100  # no sample predicts the next one's first token
    return ids, labels, cu


def flop_ratios() -> dict[str, float]:
    """Counted over analytic FLOPs of one forward + backward of the tiny preset.

    On the torch kernels. The fused cross-entropy is one op to the counter, which counts it by its
    registered formula (the logits' matmul and both gradients'), limo/kernels/cross_entropy.py. The
    reference attention reaches PyTorch's CPU flash kernel, which torch's counter has no formula
    for: it is counted as its CUDA siblings are (every query against every key of its sample).
    """
    args = PRESETS["tiny"]
    model = build_model(args, device="cpu")
    init_weights(model)
    ids, labels, cu = _packed(args, LENGTHS)
    aten = torch.ops.aten
    cpu_flash = {  # shapes in, FLOPs out
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_flash)
    previous = kernels.backend("cpu")
    kernels.set_backend("torch")
    try:
        with counter:
            model(ids, cu_seqlens=cu, max_seqlen=max(LENGTHS), labels=labels).backward()
    finally:
        kernels.set_backend(previous)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    dense = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) + counts.get("limo.linear_cross_entropy", 0)  # the head's matmuls
    analytic_dense = 6 * args.num_params(embeddings=False) * sum(LENGTHS)
    analytic_attention = step_flops(args, LENGTHS) - analytic_dense
    attention = sum(counts.get(str(op), 0) for op in (aten.bmm, *cpu_flash))
    return {"dense_flops_ratio": dense / analytic_dense, "attention_flops_ratio": attention / analytic_attention}


class _FlashLike(torch.autograd.Function):
    """Attention that keeps what flash-attn keeps for backward (q, k, v, out, an fp32 lse per
    head) and recomputes the rest, so live-memory figures mean what they mean on a GPU."""

    @staticmethod
    def forward(ctx, q, k, v, inner):
        with torch.no_grad():
            out = inner.attention(0, q, k, v)
        lse = torch.zeros(q.shape[:2], dtype=torch.float32)
        ctx.inner = inner
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = ctx.inner.attention(0, q, k, v)
        return (*torch.autograd.grad(out, (q, k, v), grad), None)


class _FlashLikeContext:
    def __init__(self, cu, max_seqlen):
        self.inner = VarlenContext(cu, max_seqlen)

    def attention(self, layer, q, k, v):
        return _FlashLike.apply(q, k, v, self.inner)


def activation_bytes_per_token_layer(args: ModelArgs, lengths: list[int], checkpointing: bool, dtype=torch.bfloat16) -> float:
    """Bytes the decoder layers keep alive for backward, per token per layer, after a forward.

    Every tensor made during the forward is tracked; what is still alive at its end (the output
    aside, the input added) is what backward will read: saved activations without
    checkpointing, each layer's input with it.
    """
    model = build_model(args, device="cpu", dtype=dtype)
    init_weights(model)
    if checkpointing:
        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    T = sum(lengths)
    _, _, cu = _packed(args, lengths)
    h = torch.randn(T, args.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(T), args.head_dim, args.rope_theta, dtype)
    ctx = _FlashLikeContext(cu, max(lengths))
    made: list[tuple[int, int, int]] = []  # (storage weak reference, address, bytes) of every output

    class Track(TorchDispatchMode):
        # Storage-level weak references: autograd may keep a saved tensor's storage after its
        # Python tensor object is gone, so tensor weakrefs would undercount.
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            out = func(*args_, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    made.append((storage._weak_ref(), storage.data_ptr(), storage.nbytes()))
            return out

    with Track():
        x = h
        for layer in model.layers:
            x = layer(x, cos, sin, ctx)
    gc.collect()
    before = {t.untyped_storage().data_ptr() for t in (h, cos, sin, *model.parameters())}  # views of these are not new
    alive = sum({ptr: n for ref, ptr, n in made if ptr not in before and not torch.UntypedStorage._expired(ref)}.values())
    for ref, _, _ in made:
        torch.UntypedStorage._free_weak_ref(ref)
    # The tracked output is not an activation; the untracked input h is one (layer 0 keeps it).
    kept = alive - x.untyped_storage().nbytes() + h.untyped_storage().nbytes()
    return kept / T / args.num_layers


def logits_peak_fraction() -> float:
    """Peak live bytes of [*, V] tensors in the Triton fused CE (fwd + bwd), over the full logits."""
    if kernels.backend("cpu") != "triton":
        raise RuntimeError("logits_peak_fraction needs the Triton kernels (TRITON_INTERPRET=1 on CPU)")
    T, H, V = 2048, 32, 1003
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    chunk = ce.chunk_tokens(T, V, torch.float32, budget_bytes=T * V * 4 // 8)  # eight chunks
    with LiveBytes(lambda t: t.dim() == 2 and t.shape[1] == V and t.shape[0] != V) as logits:
        ce.linear_cross_entropy_fwd(hidden, weight, targets, chunk_size=chunk)  # the op's implementation: loss and both gradients
    return logits.peak / (T * V * 4)


class _HostReads(TorchFunctionMode):
    """Every scalar read (.item(), float(t), bool(t), .tolist()) outside limo/kernels/reference.py, by
    the site in this repository that made it. `.tolist()` reads without dispatching an op, so it
    is seen here, at the Python call; the others dispatch aten._local_scalar_dense, seen by the
    dispatch mode `ops` (a read is one or the other, never both)."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []
        reads = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads.sites.append(_site())
                return func(*args, **(kwargs or {}))

        self.ops = Ops()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.sites.append(_site())
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.ops.__exit__(*exc)


def _site() -> str:
    """The innermost caller in this repository, outside torch and the counting modes."""
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(str(ROOT)) and "/torch/" not in f.filename
              and f.name not in ("_site", "__torch_function__", "__torch_dispatch__")]  # fmt: skip
    return f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else "?"


def host_syncs_per_step() -> tuple[int, list[str]]:
    """Scalar reads in one training step as train.py runs it (the model and optimizer of
    engine.train.build_training on a one-process group, two micro-batches, the step's result read
    as run_steps reads it)."""
    world = init_distributed("cpu", 1)
    try:
        cfg = load_config(None, ["--model.preset=tiny", "--train.dtype=float32", "--parallel.activation_checkpointing=full"])  # ARGS: the shapes
        model, _ = build_training(cfg, ARGS, world)
        g = torch.Generator().manual_seed(0)
        samples = []
        for i, n in enumerate(LENGTHS):
            ids = torch.randint(0, ARGS.vocab_size, (n,), generator=g, dtype=torch.int32)
            labels = ids.clone()
            labels[: n // 3] = -100
            samples.append(EncodedSample(ids, labels, i))
        batch = build_step(samples, world_size=1, rank=0, budget=300, epoch=0, step=0)
        assert len(batch.micro_batches) >= 2, "the profile must accumulate over micro-batches"
        with _HostReads() as reads:
            train_step(model, batch.micro_batches, batch.num_label_tokens, world.device, max_grad_norm=1.0).tolist()  # run_steps' read
        outside = [c for c in reads.sites if not c.startswith("limo/kernels/reference.py")]
        return len(outside), outside
    finally:
        dist.destroy_process_group()


def limo_32b_figures() -> dict[str, float]:
    """The 32B recipe's step simulated at full size on 8 ranks, against the planner."""
    sim = simulate(load_config(LIMO_RECIPE), 8, full_batches=2)
    return {"limo_32b_simulated_peak_gib": sim.peak_gib, "limo_32b_planner_error": abs(sim.planner_error),
            "limo_32b_planned_total_gib": sim.plan["peak_gib"]}  # fmt: skip


def measure() -> dict:
    figures = flop_ratios()
    none = activation_bytes_per_token_layer(ARGS, LENGTHS, checkpointing=False)
    full = activation_bytes_per_token_layer(ARGS, LENGTHS, checkpointing=True)
    model_bytes = layer_activation_bytes_per_token(ARGS, 2)
    figures.update(
        saved_bytes_per_token_layer_none=none,
        saved_bytes_per_token_layer_full=full,
        planner_activation_error=abs(none - model_bytes) / none,
        logits_peak_fraction=logits_peak_fraction(),
    )
    syncs, where = host_syncs_per_step()
    figures["host_syncs_per_step"] = syncs
    host = host_step(256)
    figures["sampler_host_units_per_step_b256"] = host["host_units_per_step"]
    figures["sampler_host_us_per_step_b256"] = host["host_us_per_step"]
    figures.update(limo_32b_figures())
    figures["curate_20k_dedup_decontaminate_s"] = time_curation(20_000)["wall_s"]
    grading = grading_speed()
    figures["grading_units_per_verdict"] = grading["units_per_verdict"]
    figures["grading_verdicts_per_s"] = grading["verdicts_per_s"]
    return {"figures": figures, "host_sync_sites": where}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.regression", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    result = measure()
    for name, value in result["figures"].items():
        print(f"  {name:<36} {value:.6g}")
    print(f"  host syncs at: {', '.join(result['host_sync_sites'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
