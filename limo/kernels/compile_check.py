"""Compile every Triton kernel for Hopper or Ampere, on a machine without a GPU.

    python -m limo.kernels.compile_check --arch {80,90} [--json] [--kernel NAME] [--jobs N]

Every launch configuration our host code can choose for the shapes we ship is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and the `ptxas` that Triton
bundles reports registers and spills; Triton's metadata gives the shared memory a launch asks for.
The configurations are derived from the host code's own tiling functions (rmsnorm's and the
cross-entropy's `_tiles`, paged attention's `attention_launch` and split plan, `store_tiles`) for:
  - Qwen2.5 0.5B to 72B (QWEN25): hidden sizes 896 to 8192, vocabularies 151,936 and 152,064,
    head dims 64 and 128, 5 to 8 query heads per KV head;
  - the sampler's page size (PAGE_SIZES), every decode batch up to 256 and context up to 32k;
  - bf16, fp16 and fp32 activations.

The check fails (exit 1, naming kernel and configuration) on any spill, more than 255 registers,
shared memory over the SM's per-block limit, or a block the SM cannot hold. `resident_warps` is
the occupancy the registers and shared memory allow (warps one SM holds at once, counted as CUDA's
occupancy calculator does): benchmarks/compare.py fails a change that lowers it below the committed
baseline (benchmarks/results/compile-sm{80,90}.json), i.e. registers raised past the next step.

What it cannot tell: speed. Compiling proves the code lowers and fits; how fast it runs (memory
bandwidth reached, latency hidden) needs the GPU. The figures are for the Triton in this
environment; another Triton release may allocate registers differently.

Run without TRITON_INTERPRET: a kernel defined for the interpreter cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import triton
import triton.language as tl

from limo.kernels import cross_entropy, norm
from limo.kernels import paged_attention as paged
from limo.kernels.triton_common import LAUNCH_OPTIONS, interpreting
from limo.tools.dtypes import dtype_of

# name, hidden, attention heads, KV heads, vocabulary (head dim = hidden / heads); the model
# presets in limo/model/qwen2.py agree (tests/test_compile_check.py)
QWEN25 = (
    ("Qwen2.5-0.5B", 896, 14, 2, 151936),
    ("Qwen2.5-1.5B", 1536, 12, 2, 151936),
    ("Qwen2.5-3B", 2048, 16, 2, 151936),
    ("Qwen2.5-7B", 3584, 28, 4, 152064),
    ("Qwen2.5-14B", 5120, 40, 8, 152064),
    ("Qwen2.5-32B", 5120, 40, 8, 152064),
    ("Qwen2.5-72B", 8192, 64, 8, 152064),
)
DTYPES = ("bf16", "fp16", "fp32")  # Triton's names for them, which tools.dtypes also reads
PAGE_SIZES = (16,)  # limo/eval/sampler/llm.py's block_size
MAX_DECODE_BATCH = 256  # limo/eval/sampler/llm.py's max_num_seqs
MAX_CONTEXT = 32768  # Qwen2.5's max_position_embeddings
TOKENS = 16384  # rows of a long packed micro-batch (the GPU tiles do not depend on it)


@dataclass(frozen=True)
class Target:
    name: str
    sms: tuple[int, ...]  # multiprocessor counts of the GPUs of this architecture (split plans depend on them)
    shared_per_sm: int
    shared_per_block: int  # opt-in maximum per block: the SM's, less the 1 KB the driver reserves
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


TARGETS = {
    90: Target("sm_90 (H100 SXM, H100 PCIe, H200)", sms=(132, 114), shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
    80: Target("sm_80 (A100)", sms=(108,), shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}
MAX_REGISTERS = 255
RESERVED_SHARED_PER_BLOCK = 1024


@dataclass(frozen=True)
class Build:
    """One compilation: a kernel at one launch configuration."""

    kernel: str
    fn: object  # the @triton.jit function
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type) of the runtime arguments, in order
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    aligned: tuple[str, ...]  # integer arguments that are multiples of 16 for these shapes (Triton specialises on it)

    def config(self) -> dict:
        pointers = sorted({t[1:] for _, t in self.signature if t.startswith("*")})
        return {**{k: _plain(v) for k, v in self.constexprs}, "num_warps": self.num_warps, "pointers": pointers}

    def key(self) -> str:
        return f"{self.kernel} {json.dumps(self.config(), sort_keys=True)}"


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) else str(v).removeprefix("tl.")


def _signature(**types: str) -> tuple[tuple[str, str], ...]:
    return tuple(types.items())


# ---------------------------------------------------------------------------------------------
# Launch configurations, from the host code's own tiling


def _rmsnorm_builds() -> dict[Build, set[str]]:
    builds: dict[Build, set[str]] = {}
    for name in DTYPES:
        for hidden in sorted({m[1] for m in QWEN25}):
            block_m, block_n, warps = norm._tiles(TOKENS, hidden, interp=False)
            tiles = dict(ACC=tl.float32, BLOCK_M=block_m, BLOCK_N=block_n, INTERP=False)
            p = f"*{name}"
            fwd = _signature(X=p, R=p, W=p, Y=p, S=p, RSTD="*fp32", n_rows="i32", n_cols="i32",
                             stride_x="i32", stride_r="i32", stride_y="i32", stride_s="i32", eps="fp32")  # fmt: skip
            bwd = _signature(DY=p, DS=p, S=p, W=p, RSTD="*fp32", DX=p, DW_PARTIAL="*fp32", n_rows="i32", n_cols="i32",
                             stride_dy="i32", stride_ds="i32", stride_s="i32", stride_dx="i32")  # fmt: skip
            aligned = ("n_cols", "stride_x", "stride_r", "stride_y", "stride_s", "stride_dy", "stride_ds", "stride_dx")
            for residual in (False, True):
                b = Build("rmsnorm_fwd", norm._rmsnorm_fwd_kernel, fwd, tuple({"HAS_RESIDUAL": residual, **tiles}.items()), warps, aligned)
                builds.setdefault(b, set()).add(f"hidden {hidden}")
            for has_dy, has_ds in ((True, False), (True, True), (False, True)):  # y's gradient, the sum's, or both
                consts = tuple({"HAS_DY": has_dy, "HAS_DS": has_ds, **tiles}.items())
                builds.setdefault(Build("rmsnorm_bwd", norm._rmsnorm_bwd_kernel, bwd, consts, warps, aligned), set()).add(f"hidden {hidden}")
    return builds


def _cross_entropy_builds() -> dict[Build, set[str]]:
    builds: dict[Build, set[str]] = {}
    for name in DTYPES:
        for vocab in sorted({m[4] for m in QWEN25}):
            block_t, block_v, warps = cross_entropy._tiles(vocab, interp=False)
            for targets in ("i64", "i32"):  # the host takes either
                sig = _signature(LOGITS=f"*{name}", TARGETS=f"*{targets}", LOSS="*fp32", n_rows="i32", n_cols="i32",
                                 stride_row="i32", ignore_index="i32", z_loss="fp32")  # fmt: skip
                for grad in (True, False):
                    consts = tuple(dict(WRITE_GRAD=grad, ACC=tl.float32, BLOCK_T=block_t, BLOCK_V=block_v, INTERP=False).items())
                    b = Build("cross_entropy", cross_entropy._ce_loss_grad_kernel, sig, consts, warps, ("n_cols", "stride_row"))
                    builds.setdefault(b, set()).add(f"vocab {vocab}")
    return builds


def split_counts(target: Target) -> set[int]:
    """The split counts paged attention's plan picks on this target, for decode batches of 1, 2,
    4, ..., 256 and every context up to 32k in 64-token tiles (the plan sees the context only
    through them). Batch 1 alone already reaches every count from 1 to MAX_SPLITS; larger
    batches only lower the count."""
    counts = set()
    for kv_heads in sorted({m[3] for m in QWEN25}):
        for sms in target.sms:
            for batch in (2**i for i in range(MAX_DECODE_BATCH.bit_length())):
                for context in range(paged.BLOCK_N, MAX_CONTEXT + 1, paged.BLOCK_N):
                    counts.add(paged.split_plan_for(batch, kv_heads, context, sms)[0])
    return counts


def store_configs(row: int) -> set[tuple[int, int]]:
    """store_tiles for every token count up to TOKENS (it sees a count only through its next power of two)."""
    return {paged.store_tiles(2**i, row) for i in range(TOKENS.bit_length())}


def _paged_builds(target: Target) -> dict[Build, set[str]]:
    builds: dict[Build, set[str]] = {}
    splits = split_counts(target)
    s_pads = sorted({triton.next_power_of_2(s) for s in splits if s > 1})  # the merge kernel's tile of splits
    for name in DTYPES:
        dtype = dtype_of(name)
        p = f"*{name}"
        for model, hidden, heads, kv_heads, _ in QWEN25:
            head_dim = hidden // heads
            for page in PAGE_SIZES:
                for split in sorted({min(s, 2) for s in splits}):  # one split, or several (the kernel sees only which)
                    consts, warps = paged.attention_launch(heads // kv_heads, head_dim, page, split, dtype, interp=False)
                    out = "*fp32" if split > 1 else p
                    sig = _signature(q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, block_tables_ptr="*i32", context_lens_ptr="*i32",
                                     out_ptr=out, m_ptr=out, l_ptr=out, qk_scale="fp32", partition="i32",
                                     stride_qb="i32", stride_qh="i32", stride_cb="i32", stride_ct="i32", stride_ch="i32",
                                     stride_bt="i32", stride_ob="i32", stride_oh="i32", stride_os="i32")  # fmt: skip
                    aligned = ("partition", "stride_qb", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_ob", "stride_oh",
                               "stride_os")  # fmt: skip
                    b = Build("paged_attention", paged._paged_attention_kernel, sig, tuple(consts.items()), warps, aligned)
                    builds.setdefault(b, set()).add(f"{model} page {page}")
            for s_pad in s_pads:
                consts = dict(HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), S_PAD=s_pad, INTERP=False)
                sig = _signature(part_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", out_ptr=p, num_splits="i32",
                                 stride_pb="i32", stride_ph="i32", stride_ps="i32", stride_ob="i32", stride_oh="i32")  # fmt: skip
                aligned = ("stride_pb", "stride_ph", "stride_ps", "stride_ob", "stride_oh")
                b = Build("merge_splits", paged._merge_splits_kernel, sig, tuple(consts.items()), 4, aligned)
                builds.setdefault(b, set()).add(model)
            row = kv_heads * head_dim
            for block_t, block_r in sorted(store_configs(row)):
                sig = _signature(k_ptr=p, v_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slot_ptr="*i32", T="i32", stride_kt="i32", stride_vt="i32")
                consts = dict(ROW=row, BLOCK_T=block_t, BLOCK_R=block_r)
                b = Build("store_kv", paged._store_kv_kernel, sig, tuple(consts.items()), 4, ("stride_kt", "stride_vt"))
                builds.setdefault(b, set()).add(model)
    return builds


def builds(arch: int) -> list[tuple[Build, list[str]]]:
    """Every (build, the shapes that choose it) for `arch`, in a fixed order."""
    target = TARGETS[arch]
    found = {**_rmsnorm_builds(), **_cross_entropy_builds(), **_paged_builds(target)}
    return sorted(((b, sorted(shapes)) for b, shapes in found.items()), key=lambda item: item[0].key())


# ---------------------------------------------------------------------------------------------
# Compile and read the resources


@dataclass
class Usage:
    registers: int
    spill_bytes: int  # bytes spilled to local memory (stores), as ptxas reports them
    stack_bytes: int
    shared_bytes: int  # per block: Triton's dynamic shared memory and any static
    loads: list[str] = field(default_factory=list)  # PTX global load instructions used
    stores: list[str] = field(default_factory=list)


def compile_kernel(build: Build, arch: int) -> Usage:
    """Compile `build` for sm_`arch` and read ptxas's report (Triton's own ptxas run, with its options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("limo.kernels.compile_check needs kernels defined without TRITON_INTERPRET (env -u TRITON_INTERPRET ...)")
    names = build.fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in build.signature if t.startswith("*") or k in build.aligned}
    source = ASTSource(fn=build.fn, signature={**dict(build.signature), **{k: "constexpr" for k, _ in build.constexprs}},
                       constexprs=dict(build.constexprs), attrs=attrs)  # fmt: skip
    knobs = triton.knobs
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), knobs.cache.scope(), tempfile.TemporaryDirectory() as cache:
        # Always compile (a cached kernel skips ptxas and its report), into a cache of this call's own.
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # ptxas's -v report, which Triton prints
        knobs.cache.dir = cache
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": build.num_warps, **LAUNCH_OPTIONS})
    report = log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    if registers is None:
        raise RuntimeError(f"{build.kernel}: no ptxas report in Triton's output:\n{report[-2000:]}")

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    ptx = compiled.asm["ptx"]
    return Usage(
        registers=int(registers.group(1)),
        spill_bytes=number(r"(\d+) bytes spill stores"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        shared_bytes=compiled.metadata.shared + number(r"(\d+) bytes smem"),
        loads=sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
        stores=sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
    )


def resident_warps(registers: int, shared_bytes: int, num_warps: int, target: Target) -> int:
    """Warps of this kernel one SM holds at once, as CUDA's occupancy calculator counts them.

    Registers are allocated per warp in units of 256 (8 per thread), from 4 sub-partitions of
    the register file; shared memory per block adds the driver's 1 KB. So a kernel's registers
    move its occupancy only in steps: at 8 warps per block, 64 registers per thread allow 32
    resident warps, 65 to 80 allow 24, 81 to 128 allow 16 (blocks are whole).
    """
    regs_per_warp = -(-registers * 32 // 256) * 256
    warps_by_registers = (target.registers_per_sm // 4 // regs_per_warp) * 4
    blocks_by_shared = target.shared_per_sm // (-(-shared_bytes // 128) * 128 + RESERVED_SHARED_PER_BLOCK)
    blocks = min(warps_by_registers // num_warps, blocks_by_shared, target.max_warps_per_sm // num_warps, target.max_blocks_per_sm)
    return blocks * num_warps


def problems(row: dict, target: Target) -> list[str]:
    """Why this compiled configuration cannot ship (empty when it can)."""
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes")
    if row["registers"] > MAX_REGISTERS:
        found.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    if row["shared_bytes"] > target.shared_per_block:
        found.append(f"{row['shared_bytes']} bytes of shared memory > {target.shared_per_block} per block")
    if row["resident_warps"] == 0:
        found.append("no block fits on an SM")
    return found


_BUILDS: list[tuple[Build, list[str]]] = []  # this run's builds; forked workers inherit them and take an index


def _compile_row(arch: int, index: int) -> dict:
    build, shapes = _BUILDS[index]
    usage = compile_kernel(build, arch)
    return {
        "kernel": build.kernel,
        "config": build.config(),
        "registers": usage.registers,
        "spill_bytes": usage.spill_bytes,
        "shared_bytes": usage.shared_bytes,
        "resident_warps": resident_warps(usage.registers, usage.shared_bytes, build.num_warps, TARGETS[arch]),
        "shapes": shapes,
    }


def run(arch: int, kernel: str | None = None, jobs: int | None = None) -> dict:
    """Compile every configuration (of `kernel`, when named) for `arch`; the JSON object --json prints."""
    _BUILDS[:] = [(b, s) for b, s in builds(arch) if kernel is None or b.kernel == kernel]
    jobs = jobs or min(len(_BUILDS), os.cpu_count() or 1, 8)
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_row, [arch] * len(_BUILDS), range(len(_BUILDS))))
    else:
        rows = [_compile_row(arch, i) for i in range(len(_BUILDS))]
    return {"arch": arch, "triton": triton.__version__, "kernels": rows}


def table(result: dict) -> str:
    target = TARGETS[result["arch"]]
    lines = [f"{target.name}, Triton {result['triton']}: {len(result['kernels'])} configurations",
             f"{'kernel':<16} {'regs':>5} {'spill':>6} {'smem':>7} {'warps/SM':>8}  config"]  # fmt: skip
    for row in result["kernels"]:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items() if k not in ("INTERP", "ACC"))
        flag = "  <- " + "; ".join(problems(row, target)) if problems(row, target) else ""
        lines.append(f"{row['kernel']:<16} {row['registers']:>5} {row['spill_bytes']:>6} {row['shared_bytes']:>7} "
                     f"{row['resident_warps']:>8}  {config}{flag}")  # fmt: skip
    lines.append("most per kernel (registers, spill bytes, shared bytes; fewest resident warps):")
    for name in sorted({r["kernel"] for r in result["kernels"]}):
        rows = [r for r in result["kernels"] if r["kernel"] == name]
        lines.append(f"  {name:<16} {max(r['registers'] for r in rows):>4} regs  {max(r['spill_bytes'] for r in rows):>4} spill  "
                     f"{max(r['shared_bytes'] for r in rows):>6} smem  {min(r['resident_warps'] for r in rows):>3} warps/SM  "
                     f"({len(rows)} configurations)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=sorted(TARGETS), required=True, help="80: A100; 90: H100/H200")
    p.add_argument("--json", action="store_true", help='print one JSON object {"arch", "kernels": [...]} instead of a table')
    p.add_argument("--kernel", choices=("rmsnorm_fwd", "rmsnorm_bwd", "cross_entropy", "paged_attention", "merge_splits", "store_kv"),
                   help="compile this kernel's configurations only")  # fmt: skip
    p.add_argument("--jobs", type=int, help="compiler processes (default: the CPUs, at most 8)")
    args = p.parse_args(argv)
    if interpreting():
        p.error("TRITON_INTERPRET is set: kernels defined for the interpreter cannot be compiled (run with env -u TRITON_INTERPRET)")
    result = run(args.arch, args.kernel, args.jobs)
    print(json.dumps(result, indent=1) if args.json else table(result))
    failed = [(r, problems(r, TARGETS[args.arch])) for r in result["kernels"]]
    for row, found in failed:
        if found:
            print(f"FAIL sm_{args.arch} {row['kernel']} {json.dumps(row['config'])}: {'; '.join(found)}", file=sys.stderr)
    return 1 if any(found for _, found in failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
