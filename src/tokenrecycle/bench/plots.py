"""The report's PNG plots: speedup by category and method, accepted lengths, runner cost curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import OVERALL, categories  # noqa: E402
from .results import Section  # noqa: E402


def plot_speedups(section: Section, stats, path: Path) -> Path:
    """Grouped bars: per category (and overall), one bar per method that has a baseline."""
    cats = [*categories(section), OVERALL]
    methods = [m for m, info in section.methods.items() if info.baseline is not None]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cats)), 4.5))
    for index, method in enumerate(methods):
        values = [stats[method][c].speedup for c in cats]
        ax.bar(np.arange(len(cats)) + index * width, np.nan_to_num(values), width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(cats)) + width * (len(methods) - 1) / 2, cats, rotation=30, ha="right")
    ax.set_ylabel("speedup over own baseline")
    ax.set_title(f"Speedup by category, {section.dtype}")
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def plot_accepted_lengths(section: Section, stats, path: Path) -> Path:
    """Share of forward passes that decided 1, 2, 3, ... tokens, per drafting method."""
    methods = [m for m in section.methods if len(stats[m][OVERALL].accepted) > 1]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        counts = stats[method][OVERALL].accepted
        total = sum(counts.values())
        lengths = sorted(counts)
        ax.plot(lengths, [counts[n] / total for n in lengths], marker="o", label=method)
    ax.set_xlabel("tokens decided per forward pass")
    ax.set_ylabel("share of forward passes")
    ax.set_title(f"Accepted lengths, {section.dtype}")
    if methods:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_cost_curves(section: Section, path: Path) -> Path | None:
    """Forward time against the number of tree tokens, per runner (log-log)."""
    curves = section.cost_curves
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for runner, costs in curves.items():
        ax.plot(list(costs), list(costs.values()), marker="o", label=runner)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tree tokens per forward pass")
    ax.set_ylabel("ms per forward pass")
    ax.set_title(f"Runner cost curve, {section.dtype}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_tree_checks(checks, frontier, dtype: str, path: Path) -> Path | None:
    """Predicted against measured tokens per step and tokens/s, by tree size; the line is the
    profile's prediction for the best tree of each size, the curve the tuner chose from."""
    if not checks:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, planned, predicted, measured, label in (
        (left, lambda p: p.expected_tokens, lambda c: c.predicted_tokens, lambda c: c.measured_tokens, "tokens per step"),
        (right, lambda p: p.tokens_per_s, lambda c: c.predicted_tokens_per_s, lambda c: c.measured_tokens_per_s, "tokens/s"),
    ):
        drafting = [plan for plan in frontier if plan.num_nodes > 0]  # a log axis has no room for plain decoding
        if drafting:
            axis.plot(
                [plan.num_nodes for plan in drafting], [planned(plan) for plan in drafting],
                color="0.6", linewidth=1, label="predicted, best tree of each size",
            )  # fmt: skip
        for calibrated, style in ((True, {}), (False, {"markerfacecolor": "none"})):
            chosen = [c for c in checks if c.calibrated == calibrated]
            if chosen:
                note = "" if calibrated else " (lower bound: nodes beyond calibration)"
                axis.plot([c.nodes for c in chosen], [predicted(c) for c in chosen], "o", color="C0", label=f"predicted{note}", **style)
        axis.plot([c.nodes for c in checks], [measured(c) for c in checks], marker="s", color="C1", label="measured")
        for c in checks:
            axis.annotate(c.method.split("@")[-1], (c.nodes, measured(c)), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tree nodes")
        axis.set_ylabel(label)
        axis.legend(fontsize="x-small")
    fig.suptitle(f"Trees: tuning profile's prediction against the benchmark, {dtype}")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
