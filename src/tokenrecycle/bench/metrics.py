"""From per-prompt records to the numbers of a report. Pure functions over a results Section.

- tokens/s: per prompt the median over repeats; per category the median over prompts.
- speedup: a method's median tokens/s over its baseline's (plain decoding on its own runtime),
  in the same category: the ratio of the medians.
- MAT: new tokens over forward passes of the target, summed over prompts (prefill included).
- identical: share of prompts whose token ids equal the baseline's; first divergence: the mean
  index of the first differing token over the prompts that differ.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..trees.design import TreePlan, expected_tokens, plans_by_size, step_cost
from ..tuning import MAX_TREE_NODES, mean_cost, parse_path
from .results import Record, Section

OVERALL = "overall"
NAN = float("nan")
SINGLE_DRAFTERS = ("tr", "lookup", "retrieval")  # what `auto` chooses among, each alone


@dataclass
class MethodStats:
    prompts: int = 0
    failed: int = 0
    tokens_per_s: float = float("nan")
    speedup: float = float("nan")  # against the method's baseline
    vs_reference: float = float("nan")  # against the reference (transformers' model.generate)
    mat: float = float("nan")
    identical: float = float("nan")
    first_divergence: float = float("nan")
    peak_rss_bytes: int = 0
    seconds: float = 0.0
    accepted: dict[int, int] = field(default_factory=dict)  # accepted length -> forward passes


def categories(section: Section) -> list[str]:
    return list(dict.fromkeys(r.category for r in section.records))


def baseline_of(section: Section, method: str) -> str | None:
    """The method's own baseline where it ran, else the reference; None for the reference."""
    baseline = section.methods[method].baseline
    if baseline is None:
        return None
    return baseline if baseline in section.methods else reference_of(section)


def reference_of(section: Section) -> str:
    return next(name for name, info in section.methods.items() if info.baseline is None)


def summarize(section: Section) -> dict[str, dict[str, MethodStats]]:
    """stats[method][category], with OVERALL over all prompts."""
    groups = {c: [r for r in section.records if r.category == c] for c in categories(section)}
    groups[OVERALL] = section.records
    stats = {m: {c: group_stats([r for r in rs if r.method == m]) for c, rs in groups.items()} for m in section.methods}
    reference = reference_of(section)
    for method in section.methods:
        baseline = baseline_of(section, method)
        for category, records in groups.items():
            own = stats[method][category]
            if baseline is not None:
                own.speedup = ratio(own.tokens_per_s, stats[baseline][category].tokens_per_s)
                if not section.methods[method].temperature:  # samples are not compared token by token
                    own.identical, own.first_divergence = exactness(records, method, baseline)
            else:  # the reference is its own baseline
                own.speedup = ratio(own.tokens_per_s, own.tokens_per_s)
            own.vs_reference = ratio(own.tokens_per_s, stats[reference][category].tokens_per_s)
    return stats


@dataclass
class PairedComparison:
    """A method against a rival on the same turns: the median of the per-turn tokens/s ratios and
    a 90% bootstrap interval of that median (turns resampled)."""

    category: str
    method: str
    rival: str
    turns: int
    ratio: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return "faster" if self.low > 1 else "slower" if self.high < 1 else "within noise"


def against_best_rival(section: Section, stats, method: str = "auto", rivals=SINGLE_DRAFTERS, resamples: int = 2000) -> list[PairedComparison]:
    """Per category (and overall), `method` against the rival with the best speedup there, turn by
    turn: one method's speed varies more between prompts than between methods on one prompt."""
    rivals = [r for r in rivals if r in section.methods]
    if method not in section.methods or not rivals:
        return []
    speed = {(r.category, r.question_id, r.turn, r.method): r.tokens_per_s for r in section.records if r.ok}
    rng = np.random.default_rng(0)  # the same records give the same interval
    found = []
    for category in [*categories(section), OVERALL]:
        rival = max(rivals, key=lambda r: stats[r][category].speedup)
        turns = {key[:3] for key in speed if category in (OVERALL, key[0])}
        logs = np.log([speed[t + (method,)] / speed[t + (rival,)] for t in sorted(turns) if t + (method,) in speed and t + (rival,) in speed])
        if len(logs) == 0:
            continue
        medians = np.median(rng.choice(logs, (resamples, len(logs))), axis=1)
        low, high = np.exp(np.percentile(medians, [5, 95]))
        found.append(PairedComparison(category, method, rival, len(logs), float(np.exp(np.median(logs))), float(low), float(high)))
    return found


def temperature_suffix(temperature: float) -> str:
    """How the name of a sampled run ends (~tT): sampled runs are methods of their own."""
    return f"~t{temperature:g}" if temperature > 0 else ""


def by_temperature(section: Section, stats: dict[str, dict[str, MethodStats]]) -> dict[str, dict[float, MethodStats]]:
    """Overall stats of each method at each temperature it ran at, keyed by its greedy name."""
    table: dict[str, dict[float, MethodStats]] = {}
    for method, info in section.methods.items():
        temperature = info.temperature
        suffix = temperature_suffix(temperature)
        name = method[: -len(suffix)] if suffix and method.endswith(suffix) else method
        table.setdefault(name, {})[temperature] = stats[method][OVERALL]
    return table


def group_stats(records: list[Record]) -> MethodStats:
    ok = [r for r in records if r.ok]
    stats = MethodStats(prompts=len(ok), failed=len(records) - len(ok))
    if not ok:
        return stats
    stats.tokens_per_s = statistics.median(r.tokens_per_s for r in ok)
    stats.mat = sum(r.new_tokens for r in ok) / sum(len(r.accepted_lengths) for r in ok)
    stats.accepted = dict(sorted(Counter(n for r in ok for n in r.accepted_lengths).items()))
    stats.peak_rss_bytes = max(r.peak_rss_bytes for r in ok)
    stats.seconds = sum(sum(r.seconds) for r in ok)
    return stats


def exactness(records: list[Record], method: str, baseline: str) -> tuple[float, float]:
    """Share of prompts with token ids identical to the baseline's, and the mean first divergence."""
    outputs = {(r.question_id, r.turn): r.token_ids for r in records if r.method == baseline and r.ok}
    pairs = [
        (r.token_ids, outputs[key])
        for r in records
        if r.method == method and r.ok and (key := (r.question_id, r.turn)) in outputs
    ]
    if not pairs:
        return float("nan"), float("nan")
    divergences = [first_difference(a, b) for a, b in pairs]
    differing = [d for d in divergences if d is not None]
    return 1 - len(differing) / len(pairs), statistics.mean(differing) if differing else float("nan")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where the two outputs differ (None when equal)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


@dataclass
class TreeCheck:
    """A fixed tree's tokens per decoding step and speed: as the tuning profile predicts, as measured."""

    method: str
    nodes: int
    depth: int
    predicted_tokens: float
    measured_tokens: float  # new tokens per forward pass after the prefill
    predicted_tokens_per_s: float  # forward passes only: the loop's own time comes on top
    measured_tokens_per_s: float
    calibrated: bool = True  # False: some nodes lie outside the calibration tree and count as never
    # accepted, so the prediction is a lower bound


def profile_rates_and_cost(section: Section) -> tuple[dict, dict[int, float]] | None:
    """The acceptance rates and the mean cost curve of the section's tuning profile, if it had one."""
    profile = section.profile
    if not profile:
        return None
    rates = {parse_path(p): v["rate"] for p, v in profile["acceptance"].items()}
    cost = mean_cost({int(c): {int(n): ms for n, ms in curve.items()} for c, curve in profile["cost_ms"].items()})
    return rates, cost


def tree_checks(section: Section, stats: dict[str, dict[str, MethodStats]]) -> list[TreeCheck]:
    """For each greedy Token Recycling method on the profiled runner with one tree for every step."""
    profiled = profile_rates_and_cost(section)
    if profiled is None:
        return []
    rates, cost = profiled
    checks = []
    for method, info in section.methods.items():
        if info.base not in ("tr", "tr-cold") or "paths" not in info.settings or info.temperature:
            continue  # the profile's rates are greedy acceptance: they predict greedy runs only
        paths = [tuple(p) for p in info.settings["paths"]]
        known = [p for p in paths if all(p[:i] in rates for i in range(1, len(p) + 1))]
        predicted = expected_tokens(known, rates)
        ok = [r for r in section.records if r.method == method and r.ok and len(r.accepted_lengths) > 1]
        decoded = sum(sum(r.accepted_lengths[1:]) for r in ok)
        passes = sum(len(r.accepted_lengths) - 1 for r in ok)
        checks.append(TreeCheck(
            method, len(paths), max((len(p) for p in paths), default=0), predicted, decoded / passes if passes else NAN,
            1000.0 * predicted / step_cost(cost, len(paths) + 1), stats[method][OVERALL].tokens_per_s,
            calibrated=len(known) == len(paths),
        ))  # fmt: skip
    return sorted(checks, key=lambda check: check.nodes)


def profile_frontier(section: Section, max_nodes: int = MAX_TREE_NODES) -> list[TreePlan]:
    """What the profile predicts for the best tree of every size: the curve the tuner chose from."""
    profiled = profile_rates_and_cost(section)
    return plans_by_size(*profiled, max_nodes) if profiled else []
