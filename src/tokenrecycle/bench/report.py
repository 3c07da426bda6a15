"""report.md and the plots, drawn from a run's results alone (`tokenrecycle bench --render DIR`).

One part per dtype, laid out like the Token Recycling paper's table: speedup per category, then
MAT, tokens/s and the overall speedup; then the details (exactness, memory, failures), the
distribution of accepted lengths and the runners' cost curves.
"""

from __future__ import annotations

from pathlib import Path

from .metrics import (
    OVERALL, MethodStats, against_best_rival, baseline_of, by_temperature, categories, profile_frontier, summarize, tree_checks,
)  # fmt: skip
from .plots import plot_accepted_lengths, plot_cost_curves, plot_speedups, plot_tree_checks
from .results import BenchRun, Section, load_results

REPORT_FILE = "report.md"
MIB = 1 << 20


def render(out: str | Path) -> Path:
    """Write report.md and the PNG plots of a results directory; return the report's path."""
    out = Path(out)
    run = load_results(out)
    parts = [header(run)]
    for section in run.sections:
        if not section.records:
            continue
        stats = summarize(section)
        checks = tree_checks(section, stats)
        dtype = section.dtype
        plots = [
            plot_speedups(section, stats, out / f"speedup_{dtype}.png"),
            plot_accepted_lengths(section, stats, out / f"accepted_{dtype}.png"),
            plot_cost_curves(section, out / f"cost_{dtype}.png"),
            plot_tree_checks(checks, profile_frontier(section), dtype, out / f"trees_{dtype}.png"),
        ]
        parts.append(section_report(section, stats, checks, [p for p in plots if p is not None]))
    path = out / REPORT_FILE
    path.write_text("\n\n".join(parts) + "\n")
    return path


def header(run: BenchRun) -> str:
    machine, settings = run.machine, run.settings
    status = "" if run.status == "complete" else f"\n\n**Partial run ({run.status}).**"
    versions = ", ".join(f"{k} {v}" for k, v in machine.versions.items())
    return (
        f"# tokenrecycle bench: {settings.model}{status}\n\n"
        f"- Machine: {f'{machine.gpu} (the model ran there), ' if machine.gpu else ''}{machine.cpu}, {machine.cores} cores, {machine.torch_threads} threads; {versions}\n"
        f"- Prompts: {settings.questions} questions ({settings.turns} turns) from {settings.question_source}; "
        f"categories: {', '.join(settings.categories)}\n"
        f"- {decoding_text(settings.temperatures)}, up to {settings.max_new_tokens} new tokens per turn, {settings.repeats} repeat(s), "
        f"{settings.warm_up} warm-up prompts; methods interleaved per prompt in rotating order; started {run.started}\n"
        "- tokens/s: median over prompts. Speedup: ratio of a method's median tokens/s to its baseline's "
        "(plain decoding on its own runtime). MAT: new tokens per forward pass of the target, prefill included."
    )


def decoding_text(temperatures: tuple[float, ...]) -> str:
    sampled = [f"{t:g}" for t in temperatures if t > 0]
    greedy = "greedy decoding" if 0 in temperatures else ""
    samples = f"sampling at temperature {', '.join(sampled)} (top-k 50; methods named ~tT)" if sampled else ""
    return " and ".join(part for part in (greedy, samples) if part).capitalize()


def section_report(section: Section, stats: dict[str, dict[str, MethodStats]], checks, plots: list[Path]) -> str:
    parts = [
        f"## {section.dtype} ({section.dtype_reason}; runner {section.runner}"
        + (f" ({section.loop})" if section.loop else "") + f", default tree {section.default_tree})",
        "### Speedup by category, MAT, tokens/s and overall speedup\n\n" + paper_table(section, stats),
        "### Details (all prompts)\n\n" + details_table(section, stats),
        "### MAT by category\n\n" + category_table(section, stats, lambda s: fmt(s.mat)),
        "### Tokens/s by category (median)\n\n" + category_table(section, stats, lambda s: fmt(s.tokens_per_s, 1)),
        "### Accepted tokens per forward pass (share of passes)\n\n" + accepted_table(stats),
    ]
    runs = by_temperature(section, stats)
    temperatures = sorted({t for per_method in runs.values() for t in per_method})
    if len(temperatures) > 1:
        parts.append("### Greedy and sampled: overall speedup and MAT by temperature\n\n" + temperature_table(runs, temperatures))
    paired = against_best_rival(section, stats)
    if paired:
        parts.append("### auto against the best single drafter (paired per turn)\n\n" + paired_table(paired, stats))
    if checks:
        parts.append("### Trees: predicted by the tuning profile and measured\n\n" + checks_table(checks))
    if section.cost_curves:
        parts.append("### Runner cost: ms for one forward pass of n tree tokens on 256 cached tokens (ratio to n=1)\n\n" + cost_table(section.cost_curves))
    parts.append(methods_list(section))
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    failures = failure_list(section)
    if failures:
        parts.append(failures)
    return "\n\n".join(parts)


def paper_table(section: Section, stats) -> str:
    cats = categories(section)
    rows = [["method", *cats, "MAT", "tokens/s", "overall speedup"]]
    for method in section.methods:
        overall = stats[method][OVERALL]
        rows.append([method, *(fmt_x(stats[method][c].speedup) for c in cats), fmt(overall.mat), fmt(overall.tokens_per_s, 1), fmt_x(overall.speedup)])
    return markdown(rows)


def temperature_table(runs: dict[str, dict[float, MethodStats]], temperatures: list[float]) -> str:
    """Each method's overall speedup (against plain decoding or sampling at the same temperature)
    and MAT per temperature; "kept" is the sampled speedup over the greedy one."""
    kept_column = {t: t > 0 and 0.0 in temperatures for t in temperatures}
    head = ["method"]
    for t in temperatures:
        label = "greedy" if t == 0 else f"T={t:g}"
        head += [f"{label} speedup", f"{label} MAT"] + (["kept of greedy"] if kept_column[t] else [])
    rows = [head]
    for name, per_temperature in runs.items():
        greedy = per_temperature.get(0.0)
        row = [name]
        for t in temperatures:
            run = per_temperature.get(t, MethodStats())
            row += [fmt_x(run.speedup), fmt(run.mat)]
            if kept_column[t]:
                row.append(fmt_share(run.speedup / greedy.speedup) if greedy else "n/a")
        rows.append(row)
    return markdown(rows)


def paired_table(paired, stats) -> str:
    method = paired[0].method
    rows = [["category", "best single drafter", "its speedup", f"{method}'s speedup", "turns", f"{method} / it (median per turn)", "90% interval", "verdict"]]
    for c in paired:
        rows.append([c.category, c.rival, fmt_x(stats[c.rival][c.category].speedup), fmt_x(stats[method][c.category].speedup), str(c.turns), fmt(c.ratio, 3), f"{fmt(c.low, 3)}-{fmt(c.high, 3)}", c.verdict])
    return markdown(rows)


def details_table(section: Section, stats) -> str:
    rows = [[
        "method", "baseline", "tokens/s", "speedup", "vs model.generate", "MAT", "identical to baseline",
        "first divergence (mean token)", "peak RSS MiB", "memory added MiB", "drafter bytes", "wall s", "failed",
    ]]  # fmt: skip
    for method, info in section.methods.items():
        s = stats[method][OVERALL]
        rows.append([
            method, baseline_of(section, method) or "(reference)", fmt(s.tokens_per_s, 1), fmt_x(s.speedup),
            fmt_x(s.vs_reference), fmt(s.mat), fmt_share(s.identical), fmt(s.first_divergence, 1),
            f"{s.peak_rss_bytes / MIB:.0f}", f"{info.memory_added_bytes / MIB:.0f}", str(info.drafter_bytes),
            f"{s.seconds:.1f}", str(s.failed),
        ])  # fmt: skip
    return markdown(rows)


def category_table(section: Section, stats, cell) -> str:
    cats = [*categories(section), OVERALL]
    return markdown([["method", *cats]] + [[m, *(cell(stats[m][c]) for c in cats)] for m in section.methods])


def accepted_table(stats) -> str:
    longest = max((max(s[OVERALL].accepted, default=1) for s in stats.values()), default=1)
    rows = [["method", *(str(n) for n in range(1, longest + 1))]]
    for method, by_category in stats.items():
        counts = by_category[OVERALL].accepted
        total = sum(counts.values()) or 1
        rows.append([method, *(f"{counts.get(n, 0) / total:.0%}" if counts.get(n) else "" for n in range(1, longest + 1))])
    return markdown(rows)


def cost_table(curves: dict[str, dict[int, float]]) -> str:
    sizes = list(next(iter(curves.values())))
    rows = [["runner", *(f"n={n}" for n in sizes)]]
    for runner, costs in curves.items():
        one = costs[sizes[0]]
        rows.append([runner, f"{one:.1f} ms", *(f"{costs[n]:.1f} ({costs[n] / one:.2f})" for n in sizes[1:])])
    return markdown(rows)


def checks_table(checks) -> str:
    rows = [["method", "nodes", "depth", "tokens/step predicted", "measured", "tokens/s predicted (forward passes only)", "measured"]]
    for c in checks:
        rows.append([
            c.method, str(c.nodes), str(c.depth), bound(c) + fmt(c.predicted_tokens), fmt(c.measured_tokens),
            bound(c) + fmt(c.predicted_tokens_per_s, 1), fmt(c.measured_tokens_per_s, 1),
        ])  # fmt: skip
    note = (
        "\n\n≥: the tree has nodes outside the calibration tree; they count as never accepted, so the "
        "prediction is a lower bound."
    )
    return markdown(rows) + (note if any(not c.calibrated for c in checks) else "")


def bound(check) -> str:
    return "" if check.calibrated else "≥"


def methods_list(section: Section) -> str:
    reason = f" ({section.tree_reason})" if section.tree_reason else ""
    lines = [f"### Methods\n\nDefault tree: {section.default_tree}{reason}\n"]
    for method, info in section.methods.items():
        settings = ", ".join(f"{k}={v}" for k, v in info.settings.items() if k != "paths")
        warning = f" **Warm-up failed: {info.warm_up_error}**" if info.warm_up_error else ""
        lines.append(f"- `{method}`: {info.description}" + (f" ({settings})" if settings else "") + warning + details_text(section, method))
    lines += [f"- `{method}`: not run: {reason}" for method, reason in section.unavailable.items()]
    return "\n".join(lines)


def details_text(section: Section, method: str) -> str:
    """The last counters a method reported (cumulative), e.g. the auto drafter's credit per drafter."""
    details = next((r.details for r in reversed(section.records) if r.method == method and r.details), None)
    if not details:
        return ""
    return ". " + "; ".join(f"{key}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for key, values in details.items())


def failure_list(section: Section, shown: int = 20) -> str:
    failed = [r for r in section.records if not r.ok]
    if not failed:
        return ""
    lines = [f"### Failures ({len(failed)})"]
    lines += [f"- `{r.method}` on {r.category} {r.question_id} turn {r.turn + 1}: {r.error}" for r in failed[:shown]]
    if len(failed) > shown:
        lines.append(f"- ... and {len(failed) - shown} more in results.json")
    return "\n".join(lines)


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def fmt_x(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}x"


def fmt_share(value: float) -> str:
    return "n/a" if value != value else f"{value:.0%}"
