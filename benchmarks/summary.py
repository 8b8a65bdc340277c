"""summary-<device>.json: the headline figures of one GPU's suite run, built from its stages' JSON.

    python -m benchmarks.summary --dir benchmarks/results --device NVIDIA-H100-80GB-HBM3

Stage files (benchmarks/gpu_suite.sh writes them as <stage>-<device>.json): rmsnorm-full,
cross_entropy, train_step (and train_step-compile), sampler. Headline figures:
  rmsnorm_bw_fraction        ours, forward: median over the full sweep of GB/s over the measured copy bandwidth
  flce_time_ratio_vs_liger   ours / Liger (its default) fused linear cross-entropy forward+backward time,
                             geometric mean over the sweep (< 1: ours is faster)
  flce_mem_ratio_vs_liger    the same for the peak memory a call adds
                             (details: both also against Liger with fp32 accumulation, our precision)
  train_mfu_32b_layers       causal-aware MFU of one Qwen2.5-32B layer at 16k packed tokens (the per-layer
                             fit that benchmarks/project.py projects from)
  sampler_roofline_fraction  decode tokens/s over the bandwidth roofline: the lowest at batch >= 64
  memory_plan_rel_error      (planner - measured reserved peak) / measured: the largest in magnitude over
                             the train-step configs on our kernels that ran
A figure whose stage is missing or failed is null, and "missing" says why: nothing is invented.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks import project

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"rmsnorm": ("rmsnorm-full",), "ce": ("cross_entropy",), "train": ("train_step", "train_step-compile"), "sampler": ("sampler",)}
HEADLINES = ("rmsnorm_bw_fraction", "flce_time_ratio_vs_liger", "flce_mem_ratio_vs_liger", "train_mfu_32b_layers",
             "sampler_roofline_fraction", "memory_plan_rel_error")  # fmt: skip
LARGE_BATCH = 64


class Missing(Exception):
    """A headline that cannot be computed from what was measured; the message says why."""


def _ok(records: list[dict], **match) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def _geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def rmsnorm_bw_fraction(stage: dict) -> tuple[float, dict]:
    fwd = _ok(stage["records"], provider="ours", mode="fwd")
    if not fwd:
        raise Missing("no ok forward record of ours in the rmsnorm stage")
    both = _ok(stage["records"], provider="ours", mode="fwd+bwd")
    detail = {"median_fwd_bwd": statistics.median(r["fraction_of_ceiling"] for r in both) if both else None,
              "cases": len(fwd), "copy_gbps": stage["ceilings"]["copy_gbps"]}  # fmt: skip
    return statistics.median(r["fraction_of_ceiling"] for r in fwd), detail


def _flce_pairs(stage: dict, liger: str = "liger") -> dict[str, tuple[dict, dict]]:
    """Forward+backward cases where ours and a Liger provider both ran: case -> (ours, liger)."""
    ours = {json.dumps(r["case"], sort_keys=True): r for r in _ok(stage["records"], provider="ours", mode="fwd+bwd")}
    theirs = {json.dumps(r["case"], sort_keys=True): r for r in _ok(stage["records"], provider=liger, mode="fwd+bwd")}
    both = sorted(set(ours) & set(theirs))
    if not both:
        statuses = sorted({r["status"] for r in stage["records"] if r["provider"] == liger})
        raise Missing(f"no case where ours and {liger} both ran forward+backward ({liger}: {statuses or 'not run'})")
    return {c: (ours[c], theirs[c]) for c in both}


def _time_ratios(stage: dict, liger: str) -> dict[str, float]:
    return {c: o["median_ms"] / lg["median_ms"] for c, (o, lg) in _flce_pairs(stage, liger).items()}


def _mem_ratios(stage: dict, liger: str) -> dict[str, float]:
    ratios = {c: o["peak_extra_bytes"] / lg["peak_extra_bytes"] for c, (o, lg) in _flce_pairs(stage, liger).items()
              if o["peak_extra_bytes"] and lg["peak_extra_bytes"]}  # fmt: skip
    if not ratios:
        raise Missing(f"no forward+backward case with the peak memory of both ours and {liger} (measured on CUDA only)")
    return ratios


def _with_equal_precision(stage: dict, ratios: dict[str, float], of) -> dict:
    """The headline's per-case ratios, and the same against Liger accumulating in fp32 as we do
    (its default sums the weight gradient in bf16: half our buffer's memory, not our precision)."""
    try:
        fp32 = of(stage, "liger-fp32")
        equal = {"geomean": _geomean(list(fp32.values())), "per_case": fp32}
    except Missing as e:
        equal = {"missing": str(e)}
    return {"per_case": ratios, "vs_liger_fp32": equal}


def flce_time_ratio(stage: dict) -> tuple[float, dict]:
    ratios = _time_ratios(stage, "liger")
    return _geomean(list(ratios.values())), _with_equal_precision(stage, ratios, _time_ratios)


def flce_mem_ratio(stage: dict) -> tuple[float, dict]:
    ratios = _mem_ratios(stage, "liger")
    return _geomean(list(ratios.values())), _with_equal_precision(stage, ratios, _mem_ratios)


def train_section(stages: list[dict]) -> dict:
    """The train-step stages merged: what benchmarks/project.py reads."""
    first = stages[0]
    return {"model": first["model"], "environment": first["environment"], "fits": [f for s in stages for f in s["fits"]],
            "records": [r for s in stages for r in s["records"]]}  # fmt: skip


def memory_plan_rel_error(section: dict) -> tuple[float, dict]:
    """Over the configs on our kernels: the planner counts what they save, not what the torch
    references (fp32 logits) or Liger's kernels hold."""
    errors = {r["extra"]["name"]: r["extra"]["plan_rel_error"] for r in section["records"]
              if r["provider"] == "triton" and r["extra"].get("plan_rel_error") is not None}  # fmt: skip
    if not errors:
        raise Missing("no train-step config on our kernels ran with a measured peak (CUDA) to hold the planner against")
    return max(errors.values(), key=abs), errors


def sampler_roofline_fraction(stage: dict) -> tuple[float, dict]:
    decode = _ok(stage["records"], provider="ours", mode="decode")
    large = [r for r in decode if r["case"]["batch"] >= LARGE_BATCH]
    if not large:
        raise Missing(f"no ok decode record of ours at batch >= {LARGE_BATCH}")
    per_batch = {r["case"]["batch"]: {"roofline_fraction": r["fraction_of_ceiling"], "tokens_per_s": r["extra"]["tokens_per_s"],
                                      "vs_transformers": r["extra"].get("vs_transformers")} for r in decode}  # fmt: skip
    ratios = [r["extra"]["vs_transformers"] for r in large if r["extra"].get("vs_transformers") is not None]
    detail = {"per_batch": per_batch, "min_vs_transformers_at_large_batch": min(ratios) if ratios else None,
              "greedy_agreement": stage.get("greedy_agreement")}  # fmt: skip
    return min(r["fraction_of_ceiling"] for r in large), detail


def load_stages(folder: Path, device: str, partial_ok: bool = False) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each stage's runs; with `partial_ok`, runs of other sweeps than the full ones count too
    (gpu_suite.sh quick: the headlines of a shorter run, marked partial)."""
    found, missing = {}, {}
    for stage, names in STAGES.items():
        files = [folder / f"{n}-{device}.json" for n in names if (folder / f"{n}-{device}.json").is_file()]
        runs = [json.loads(f.read_text()) | {"_file": str(f)} for f in files]
        partial = [f"{Path(r['_file']).name} (sweep {r.get('sweep')!r})" for r in runs if r.get("sweep") != "full" and not partial_ok]
        if partial:
            missing[stage] = f"{', '.join(partial)}: the headlines come from the full sweeps only"
        elif runs:
            found[stage] = runs
        else:
            wanted = " or ".join(f"{n}-{device}.json" for n in names)
            missing[stage] = f"no {wanted} in {folder}: run `bash benchmarks/gpu_suite.sh {stage}`"
    return found, missing


def build(folder: Path, device: str, partial: bool = False) -> dict:
    stages, missing = load_stages(folder, device, partial)
    values: dict[str, float | None] = dict.fromkeys(HEADLINES)
    details: dict[str, object] = {}

    def attempt(key: str, stage: str, fn) -> None:
        if stage not in stages:
            missing[key] = missing[stage]
            return
        try:
            out = fn()
        except Missing as e:
            missing[key] = str(e)
            return
        values[key], details[key] = out

    attempt("rmsnorm_bw_fraction", "rmsnorm", lambda: rmsnorm_bw_fraction(stages["rmsnorm"][0]))
    attempt("flce_time_ratio_vs_liger", "ce", lambda: flce_time_ratio(stages["ce"][0]))
    attempt("flce_mem_ratio_vs_liger", "ce", lambda: flce_mem_ratio(stages["ce"][0]))
    attempt("sampler_roofline_fraction", "sampler", lambda: sampler_roofline_fraction(stages["sampler"][0]))
    train = train_section(stages["train"]) if "train" in stages else None
    attempt("memory_plan_rel_error", "train", lambda: memory_plan_rel_error(train))

    def layer_mfu():
        try:
            fit = project.choose_fit(train)
            p, anchors = project.project(train), project.project(train, tokens_per_epoch=project.ANCHORS_TOKENS_PER_EPOCH)
        except project.MissingMeasurements as e:
            raise Missing(str(e)) from None
        if fit.get("layer_mfu") is None:
            raise Missing(f"fit {fit['group']} has no MFU: the device's peak FLOP/s is unknown (engine.metrics.PEAK_BF16_FLOPS)")
        details["limo_projection"] = {"proxy_tokens": asdict(p), "anchors_tokens": asdict(anchors)}
        return fit["layer_mfu"], fit

    attempt("train_mfu_32b_layers", "train", layer_mfu)
    sources = {
        Path(s["_file"]).name: {k: s.get(k) for k in ("command", "sweep")} | {k: s["environment"].get(k) for k in ("commit", "date", "device")}
        for group in stages.values() for s in group
    }  # fmt: skip
    commits = sorted({v["commit"] for v in sources.values() if v["commit"]})
    names = sorted({v["device"] for v in sources.values()})
    summary = {
        "device": names[0] if len(names) == 1 else names,
        "commit": commits[0] if len(commits) == 1 else commits,
        "date": max((v["date"] for v in sources.values() if v["date"]), default=None),
        "command": "bash benchmarks/gpu_suite.sh " + ("quick" if partial else " ".join(stages)),
        "partial": partial or any(s.get("sweep") != "full" for group in stages.values() for s in group),
        **values,
        "goals": goals(values, details),
        "missing": {k: missing[k] for k in HEADLINES if k in missing},
        "details": details,
        "sources": sources,
    }
    ceilings = [s["ceilings"] for group in stages.values() for s in group if {"copy_gbps", "matmul_tflops"} <= set(s.get("ceilings") or {})]
    summary["ceilings"] = ceilings[0] if ceilings else None  # the device's measured copy bandwidth and matmul rate
    if train is not None:
        summary["train_step"] = train
    return summary


def goals(values: dict, details: dict) -> dict:
    """The issue's measured goals: True / False, or None where the figure is missing."""

    def check(value, ok):
        return None if value is None else bool(ok(value))

    projection = details.get("limo_projection")
    sampler = details.get("sampler_roofline_fraction") or {}
    return {
        "train_mfu_32b_layers >= 0.5": check(values["train_mfu_32b_layers"], lambda v: v >= 0.5),
        "limo projection <= 60 min within 80 GB, no offload": None if projection is None else
            projection["proxy_tokens"]["fits_memory"] and projection["proxy_tokens"]["minutes_overlapped"] <= 60,
        f"sampler decode >= 70% of the roofline at batch >= {LARGE_BATCH}": check(values["sampler_roofline_fraction"], lambda v: v >= 0.7),
        f"sampler >= 10x transformers at batch >= {LARGE_BATCH}":
            check(sampler.get("min_vs_transformers_at_large_batch"), lambda v: v >= 10),
        "memory planner within 10% of the measured peak": check(values["memory_plan_rel_error"], lambda v: abs(v) <= 0.1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "results", help="folder of stage JSON (default: benchmarks/results)")
    ap.add_argument("--device", required=True, help="device name as in the stage files' names, e.g. NVIDIA-H100-80GB-HBM3")
    ap.add_argument("--out", type=Path, default=None, help="output (default: DIR/summary-DEVICE.json)")
    ap.add_argument("--partial", action="store_true", help="take the stages' other sweeps too (gpu_suite.sh quick); marks the summary partial")
    args = ap.parse_args(argv)
    summary = build(args.dir, args.device, args.partial)
    out = args.out or args.dir / f"summary-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    if summary["ceilings"]:
        c = summary["ceilings"]
        print(f"{'ceilings':<28} copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.1f} TFLOP/s"
              + (" (partial run: gpu_suite.sh quick)" if summary["partial"] else ""))
    for key in HEADLINES:
        value = summary[key]
        print(f"{key:<28} {value:.4f}" if value is not None else f"{key:<28} missing: {summary['missing'][key]}")
    for goal, met in summary["goals"].items():
        print(f"goal {goal}: {'-' if met is None else 'met' if met else 'NOT met'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
