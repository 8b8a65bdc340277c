"""The run's report: DIR/report.md and its figures in DIR/figures/ (matplotlib, no display needed).

Figures: chain lengths in tokens (all chains read vs those kept), scores (scored vs kept), pass
rates (when the difficulty step ran) and removals by reason and by benchmark. Lengths are counted
with --tokenizer (or the --model folder's tokenizer); without one, in words, and the axis says so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

from limo.curate.records import REASONS


def _plot_hist(path: Path, title: str, xlabel: str, series: dict[str, list[float]], bins: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = [v for vs in series.values() for v in vs]
    edges = bins if not values or min(values) == max(values) else [min(values) + k * (max(values) - min(values)) / bins
                                                                   for k in range(bins + 1)]
    for label, vs in series.items():
        if vs:
            ax.hist(vs, bins=edges, alpha=0.6, label=f"{label} ({len(vs)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("records")
    if any(series.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bars(path: Path, title: str, counts: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.barh(list(counts), list(counts.values()))
    ax.set_title(title)
    ax.set_xlabel("records")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, steps: list[tuple[str, dict]], pool_size: int, chains: list[dict], scored: list[dict],
                 rated: list[dict], kept: list[dict], gone: list[dict], count_tokens: Callable[[str], int] | None) -> Path:
    """report.md and figures/*.png; returns the report's path. `chains`: every envelope that
    entered the first step; `scored`: the score step's survivors; `rated`: everything the
    difficulty step rated (kept or not)."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    unit = "tokens" if count_tokens else "words"
    length = count_tokens or (lambda text: len(text.split()))
    kept_uids = {e["uid"] for e in kept}
    lengths_all = [length(e["chain"]) for e in chains]
    lengths_kept = [n for e, n in zip(chains, lengths_all) if e["uid"] in kept_uids]
    _plot_hist(figures / "lengths.png", f"chain length ({unit})", unit, {"pool": lengths_all, "kept": lengths_kept})
    _plot_hist(figures / "scores.png", "chain score (LIMO's four traits)", "score",
               {"scored": [e["score"] for e in scored], "kept": [e["score"] for e in kept if "score" in e]})
    if rated:
        _plot_hist(figures / "pass_rates.png", "pass rate of the difficulty model", "pass rate",
                   {"rated": [e["pass_rate"] for e in rated]}, bins=20)
    by_reason = Counter(e["reason"] for e in gone)
    by_benchmark = Counter(e["benchmark"] for e in gone if e["reason"] == "contaminated")
    _plot_bars(figures / "removals.png", "removals by reason",
               {r: by_reason[r] for r in REASONS if by_reason[r]} | {f"contaminated: {b}": n for b, n in sorted(by_benchmark.items())})

    lines = ["# Curation report", "", f"Pool: {pool_size} records. Kept: {len(kept)}. Removed: {len(gone)}.", "",
             "| step | in | kept | removed | details |", "|---|---:|---:|---:|---|"]
    for name, stats in steps:
        details = ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("records", "kept", "removed"))
        lines.append(f"| {name} | {stats.get('records', '')} | {stats.get('kept', '')} | "
                     f"{stats.get('records', 0) - stats.get('kept', 0)} | {details} |")
    lines += ["", "## Removals", "", "| reason | records |", "|---|---:|"]
    lines += [f"| {r} | {by_reason[r]} |" for r in REASONS if by_reason[r]]
    if by_benchmark:
        lines += ["", "| contaminated, by benchmark | records |", "|---|---:|"]
        lines += [f"| {b} | {n} |" for b, n in sorted(by_benchmark.items())]
    stat = _summary(lengths_all, lengths_kept, unit)
    lines += ["", "## Figures", "", stat, "", "![lengths](figures/lengths.png)", "![scores](figures/scores.png)"]
    if rated:
        lines.append("![pass rates](figures/pass_rates.png)")
    lines += ["![removals](figures/removals.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _summary(everything: list[int], kept: list[int], unit: str) -> str:
    def mean(xs: list[Any]) -> str:
        return f"{sum(xs) / len(xs):.0f}" if xs else "-"

    return f"Mean chain length: {mean(everything)} {unit} in the pool, {mean(kept)} {unit} kept."
