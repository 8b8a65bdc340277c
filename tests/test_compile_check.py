"""limo/kernels/compile_check.py: the configurations it compiles, its occupancy arithmetic, and the CI
comparison against the committed baselines (benchmarks/compare.py)."""

import ast
import copy
import json
import os
import subprocess
import sys

import pytest

from benchmarks.compare import compare_compile
from limo.kernels import compile_check as cc
from limo.kernels import paged_attention as paged
from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def compile_in_subprocess(arch: int, kernels: tuple[str, ...], pointers: list[list[str]]) -> list[dict]:
    """Compile compile_check's configurations of `kernels` whose pointer dtypes are one of `pointers`, in a
    fresh Python without TRITON_INTERPRET (a kernel defined for the interpreter cannot be compiled)."""
    script = f"""
import dataclasses, json
from limo.kernels import compile_check as cc
rows = []
for build, _ in cc.builds({arch}):
    if build.kernel in {list(kernels)!r} and build.config()["pointers"] in {pointers!r}:
        rows.append({{"key": build.key(), **dataclasses.asdict(cc.compile_kernel(build, {arch}))}})
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shapes_are_the_model_presets():
    from limo.model.qwen2 import PRESETS

    table = {name.lower(): (hidden, heads, kv, vocab) for name, hidden, heads, kv, vocab in cc.QWEN25}
    for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b"):
        a = PRESETS[name]
        assert table[name] == (a.hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size), name
        assert a.head_dim == a.hidden_size // a.num_heads


def test_sampler_limits_are_the_samplers():
    import inspect

    from limo.eval.sampler.llm import LLM

    defaults = inspect.signature(LLM.__init__).parameters
    assert defaults["block_size"].default in cc.PAGE_SIZES
    assert defaults["max_num_seqs"].default == cc.MAX_DECODE_BATCH


def test_every_triton_kernel_is_compiled():
    """Every @triton.jit kernel defined in kernels/ (launched by host code) has configurations to compile."""
    import importlib
    import pkgutil

    from limo import kernels

    jitted = set()
    for module in pkgutil.iter_modules(kernels.__path__):
        for name, obj in vars(importlib.import_module(f"limo.kernels.{module.name}")).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                jitted.add(obj)
    for arch in cc.TARGETS:
        assert {b.fn for b, _ in cc.builds(arch)} == jitted


def test_configurations_come_from_the_host_tiling():
    builds = cc.builds(90)
    norm_tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in (b.config() for b, _ in builds if b.kernel == "rmsnorm_fwd")}
    assert norm_tiles == {(4, 1024, 8), (2, 2048, 8), (1, 4096, 8), (1, 8192, 16)}  # 896 | 1536, 2048 | 3584 | 5120, 8192
    for hidden in {m[1] for m in cc.QWEN25}:
        assert any(n >= hidden for _, n, _ in norm_tiles)
    heads = {(c["GROUP"], c["HEAD_DIM"]) for c in (b.config() for b, _ in builds if b.kernel == "paged_attention")}
    assert heads == {(7, 64), (6, 128), (8, 128), (7, 128), (5, 128)}
    s_pads = {b.config()["S_PAD"] for b, _ in builds if b.kernel == "merge_splits"}
    assert s_pads == {2, 4, 8, 16, 32, 64}
    pointers = {tuple(b.config()["pointers"]) for b, _ in builds if b.kernel == "cross_entropy"}
    assert pointers == {(d, "fp32", t) for d in ("bf16", "fp16") for t in ("i32", "i64")} | {("fp32", "i32"), ("fp32", "i64")}


def test_split_plan_reaches_every_split_count():
    for target in cc.TARGETS.values():
        for sms in target.sms:
            reached = {paged.split_plan_for(1, 2, paged.BLOCK_N * t, sms)[0] for t in range(1, 513)}
            assert reached == set(range(1, paged.MAX_SPLITS + 1))
    assert cc.split_counts(cc.TARGETS[80]) == set(range(1, paged.MAX_SPLITS + 1))


@pytest.mark.parametrize("registers, shared, warps, arch, resident", [
    (32, 0, 4, 90, 64),  # limited by the 64 warps an SM holds
    (64, 0, 8, 90, 32),  # 64 x 32 x 32 = 65536 registers: the whole file
    (65, 0, 8, 90, 24),  # 72 allocated: 28 warps fit, so 3 blocks of 8
    (80, 0, 8, 90, 24),
    (81, 0, 8, 90, 16),
    (255, 0, 4, 90, 8),
    (128, 0, 16, 90, 16),
    (40, 78144, 4, 90, 8),  # 2 blocks of 79 KB shared in 228 KB
    (40, 78144, 4, 80, 8),  # 2 blocks in 164 KB
    (40, 100000, 4, 80, 4),
])
def test_resident_warps_follow_cudas_occupancy_calculator(registers, shared, warps, arch, resident):
    assert cc.resident_warps(registers, shared, warps, cc.TARGETS[arch]) == resident


def _row(kernel="store_kv", registers=64, spill=0, shared=0, warps=32, **config):
    return {"kernel": kernel, "config": {"BLOCK_T": 4, "num_warps": 4, **config}, "registers": registers, "spill_bytes": spill,
            "shared_bytes": shared, "resident_warps": warps}


def test_problems_name_what_cannot_ship():
    target = cc.TARGETS[80]
    assert cc.problems(_row(), target) == []
    assert cc.problems(_row(spill=24), target) == ["spills 24 bytes"]
    assert cc.problems(_row(shared=170_000), target) == [f"170000 bytes of shared memory > {163 * 1024} per block"]
    assert cc.problems(_row(warps=0), target) == ["no block fits on an SM"]


def test_compare_fails_on_a_new_spill_or_an_occupancy_step_and_names_the_configuration():
    base = {"arch": 90, "kernels": [_row(), _row(kernel="merge_splits", registers=90, warps=20, S_PAD=8)]}
    same_step = copy.deepcopy(base)
    same_step["kernels"][0]["registers"] = 70  # more registers, same resident warps: passes
    assert compare_compile(same_step, base) == ([], [])
    worse = copy.deepcopy(base)
    worse["kernels"][0].update(registers=72, resident_warps=24)
    worse["kernels"][1]["spill_bytes"] = 16
    regressions, _ = compare_compile(worse, base)
    assert len(regressions) == 2
    assert regressions[0].startswith('sm_90 merge_splits {"BLOCK_T": 4, "S_PAD": 8, "num_warps": 4}: spills 16 bytes')
    assert regressions[1].startswith('sm_90 store_kv {"BLOCK_T": 4, "num_warps": 4}: 72 registers') and "24 resident warps" in regressions[1]
    better = copy.deepcopy(base)
    better["kernels"][0]["resident_warps"] = 48
    assert compare_compile(better, base)[0] == [] and "better" in compare_compile(better, base)[1][0]


def test_compare_fails_when_the_configurations_change():
    base = {"arch": 80, "kernels": [_row()]}
    moved = {"arch": 80, "kernels": [_row(BLOCK_T=8)]}
    regressions, _ = compare_compile(moved, base)
    assert len(regressions) == 2 and "not in the baseline" in regressions[0] and "no longer compiled" in regressions[1]
    with pytest.raises(ValueError, match="sm_90"):
        compare_compile({"arch": 90, "kernels": []}, base)


@pytest.mark.parametrize("arch", sorted(cc.TARGETS))
def test_committed_baselines_hold_every_configuration_without_spills(arch):
    baseline = json.loads((RESULTS / f"compile-sm{arch}.json").read_text())
    assert baseline["arch"] == arch
    assert {r["kernel"] + json.dumps(r["config"], sort_keys=True) for r in baseline["kernels"]} == {
        b.kernel + json.dumps(b.config(), sort_keys=True) for b, _ in cc.builds(arch)
    }
    assert all(not cc.problems(r, cc.TARGETS[arch]) for r in baseline["kernels"])


def test_command_line_compiles_for_ampere_and_refuses_the_interpreter():
    """One kernel's configurations end to end (the full run is `make bench-ci`'s, for both architectures)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "limo.kernels.compile_check", "--arch", "80", "--kernel", "cross_entropy", "--json"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr  # Triton 3.9's warning: the options name FMA contraction
    result = json.loads(done.stdout)
    assert result["arch"] == 80 and len(result["kernels"]) == 12
    for row in result["kernels"]:
        assert set(row) >= {"kernel", "config", "registers", "spill_bytes", "shared_bytes"}
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255
    refused = subprocess.run(command, cwd=ROOT, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "TRITON_INTERPRET is set" in refused.stderr


def test_every_launch_passes_the_options_compile_check_builds_with():
    """Each `kernel[grid](...)` in limo/kernels passes triton_common.LAUNCH_OPTIONS: one left to
    Triton's default FMA contraction would change with Triton 3.10 and differ from what this
    check compiles."""
    launches = []
    for path in sorted((ROOT / "limo" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                spread = [kw.value for kw in node.keywords if kw.arg is None]
                named = any(isinstance(v, ast.Name) and v.id == "LAUNCH_OPTIONS" for v in spread)
                launches.append((f"{path.name}:{node.lineno}", named))
    assert len(launches) == 7 and all(named for _, named in launches), launches
