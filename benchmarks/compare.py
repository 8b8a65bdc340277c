"""Hold a run's figures against a committed baseline; exit 1 and name every figure that moved.

    python -m benchmarks.compare RESULTS BASELINE [--tolerance 0.10]

Three kinds of file:
  regression figures  {"figures": {name: value}} from benchmarks/regression.py, against
                      {"figures": {name: {"value": v, "rule": "equal" | "max" | "min", "tolerance": t}}}:
                      "equal" must stay within t (relative), "max" must not grow past v (1 + t),
                      "min" must not fall below v (1 - t).
  timing records      the JSON a benchmark writes through benchmarks/harness.py
                      ({"environment": {"device", ...}, "records": [{"key", "median_ms", "status", ...}]}),
                      against the same kind of file from the same device: each key's median ms may
                      not grow past the baseline's by more than --tolerance. Records that could not
                      run ("unavailable"/"error") are reported, not compared.
  compile checks      `python -m limo.kernels.compile_check --arch A --json` against the committed
                      benchmarks/results/compile-smA.json: a configuration fails when it spills and
                      its baseline did not, or when its resident warps per SM (the occupancy its
                      registers and shared memory allow) fall below the baseline's, i.e. its
                      registers rose past the next occupancy step. A configuration the host code
                      no longer chooses, or a new one, fails until the baseline is regenerated.
A figure better than its baseline passes, with a note to update the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare_figures(results: dict, baseline: dict) -> tuple[list[str], list[str]]:
    """(regressions, notes) for regression-profile figures."""
    regressions, notes = [], []
    for name, spec in baseline["figures"].items():
        if name not in results["figures"]:
            regressions.append(f"{name}: missing from the results")
            continue
        got, want, tol, rule = results["figures"][name], spec["value"], spec.get("tolerance", 0.0), spec["rule"]
        scale = max(abs(want), 1e-12)
        if rule == "equal":
            moved = abs(got - want) > tol * scale
        elif rule == "max":
            moved = got > want + tol * scale
            if got < want - tol * scale:
                notes.append(f"{name}: {got:.6g} is below the baseline {want:.6g}: better; update the baseline")
        elif rule == "min":
            moved = got < want - tol * scale
            if got > want + tol * scale:
                notes.append(f"{name}: {got:.6g} is above the baseline {want:.6g}: better; update the baseline")
        else:
            raise ValueError(f"baseline figure {name}: unknown rule {rule!r} (equal, max, min)")
        if moved:
            regressions.append(f"{name}: {got:.6g}, baseline {want:.6g} ({rule}, tolerance {tol:g})")
    for name in sorted(set(results["figures"]) - set(baseline["figures"])):
        notes.append(f"{name}: not in the baseline (value {results['figures'][name]:.6g})")
    return regressions, notes


def _device(run: dict, which: str) -> str:
    try:
        return run["environment"]["device"]
    except (KeyError, TypeError):
        raise ValueError(f"the {which} has no environment.device: not a benchmark harness JSON") from None


def compare_records(results: dict, baseline: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(regressions, notes) for the timing records of one device."""
    got_device, want_device = _device(results, "results"), _device(baseline, "baseline")
    if got_device != want_device:
        raise ValueError(f"results are from {got_device!r}, the baseline from {want_device!r}: timings compare only on the same device")
    regressions, notes = [], []
    base = {r["key"]: r["median_ms"] for r in baseline["records"] if r.get("median_ms") is not None}
    for r in results["records"]:
        ms = r.get("median_ms")
        if ms is None:
            notes.append(f"{r['key']}: {r.get('status', 'no timing')}")
            continue
        if r["key"] not in base:
            notes.append(f"{r['key']}: {ms:.4g} ms, not in the baseline")
            continue
        want = base[r["key"]]
        if ms > want * (1 + tolerance):
            regressions.append(f"{r['key']}: {ms:.4g} ms, baseline {want:.4g} ms (+{ms / want - 1:.0%})")
        elif ms < want * (1 - tolerance):
            notes.append(f"{r['key']}: {ms:.4g} ms, {1 - ms / want:.0%} faster than the baseline; update it")
    for key in sorted(set(base) - {r["key"] for r in results["records"]}):
        regressions.append(f"{key}: in the baseline, missing from the results")
    return regressions, notes


def compare_compile(results: dict, baseline: dict) -> tuple[list[str], list[str]]:
    """(regressions, notes) for kernels.compile_check results of one architecture."""
    if results["arch"] != baseline["arch"]:
        raise ValueError(f"results are for sm_{results['arch']}, the baseline for sm_{baseline['arch']}")
    arch = results["arch"]

    def keyed(run: dict) -> dict[str, dict]:
        return {f"{r['kernel']} {json.dumps(r['config'], sort_keys=True)}": r for r in run["kernels"]}

    got, want = keyed(results), keyed(baseline)
    regressions, notes = [], []
    if results.get("triton") != baseline.get("triton"):
        notes.append(f"compiled with Triton {results.get('triton')}, the baseline with {baseline.get('triton')}: another compiler "
                     "may allocate registers differently (regenerate the baseline with the change that moves Triton)")  # fmt: skip
    for key in sorted(got.keys() & want.keys()):
        g, w = got[key], want[key]
        if g["spill_bytes"] > w["spill_bytes"]:
            regressions.append(f"sm_{arch} {key}: spills {g['spill_bytes']} bytes (baseline {w['spill_bytes']})")
        if g["resident_warps"] < w["resident_warps"]:
            regressions.append(f"sm_{arch} {key}: {g['registers']} registers, {g['shared_bytes']} bytes shared: "
                               f"{g['resident_warps']} resident warps per SM, baseline {w['resident_warps']} "
                               f"({w['registers']} registers, {w['shared_bytes']} bytes)")  # fmt: skip
        elif g["resident_warps"] > w["resident_warps"]:
            notes.append(f"sm_{arch} {key}: {g['resident_warps']} resident warps per SM, baseline {w['resident_warps']}: better; "
                         "update the baseline")  # fmt: skip
    regenerate = f"regenerate: env -u TRITON_INTERPRET python -m limo.kernels.compile_check --arch {arch} --json > benchmarks/results/compile-sm{arch}.json"
    for key in sorted(got.keys() - want.keys()):
        regressions.append(f"sm_{arch} {key}: not in the baseline ({regenerate})")
    for key in sorted(want.keys() - got.keys()):
        regressions.append(f"sm_{arch} {key}: in the baseline, no longer compiled ({regenerate})")
    return regressions, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("baseline", type=Path)
    p.add_argument("--tolerance", type=float, default=0.10, help="timing records: allowed slowdown (default 0.10)")
    args = p.parse_args(argv)
    results, baseline = (json.loads(f.read_text()) for f in (args.results, args.baseline))
    if "figures" in baseline:
        regressions, notes = compare_figures(results, baseline)
    elif "arch" in baseline:
        regressions, notes = compare_compile(results, baseline)
    else:
        regressions, notes = compare_records(results, baseline, args.tolerance)
    for line in notes:
        print(f"  note: {line}")
    for line in regressions:
        print(f"  REGRESSION {line}")
    print(f"{args.results} vs {args.baseline}: {len(regressions)} regression(s)")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
