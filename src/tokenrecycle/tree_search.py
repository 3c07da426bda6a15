"""Choose the draft tree that maximises expected tokens per second on this machine (pure).

Two measurements go in: the runner's cost curve T(n), milliseconds for one forward pass of n tree
tokens (the root included), and per rank path the rate at which its node was accepted when its
parent was. Under greedy verification a node is accepted only if every ancestor was, so the
expected number of tokens one step decides is 1 (the bonus token) plus, over the tree's nodes, the
product of the rates along each node's path. For a given size, best-first growth from the root
(`trees.best_template`) maximises that sum, because a path is never more likely than its prefix;
the size is then the one with the highest expected tokens / T(size + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .trees import RankPath, best_template


@dataclass(frozen=True)
class TreePlan:
    """A chosen tree and what the measurements predict for it."""

    paths: tuple[RankPath, ...]
    expected_tokens: float  # tokens decided per step: accepted drafts + the bonus token
    step_ms: float  # predicted forward time of the tree (root included)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.expected_tokens / self.step_ms

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)


def path_probabilities(paths: Sequence[RankPath], rates: Mapping[RankPath, float]) -> list[float]:
    """Chance that each path's node is accepted: the product of the rates along the path."""
    return [math.prod(rates[path[:i]] for i in range(1, len(path) + 1)) for path in paths]


def expected_tokens(paths: Sequence[RankPath], rates: Mapping[RankPath, float]) -> float:
    return 1.0 + sum(path_probabilities(paths, rates))


def step_cost(cost_ms: Mapping[int, float], tree_tokens: int) -> float:
    """Forward time of `tree_tokens` tokens, interpolated linearly between measured sizes (and
    extrapolated from the last two beyond the largest)."""
    sizes = sorted(cost_ms)
    if tree_tokens in cost_ms:
        return float(cost_ms[tree_tokens])
    if tree_tokens > sizes[-1] and len(sizes) > 1:
        a, b = sizes[-2], sizes[-1]
        slope = (cost_ms[b] - cost_ms[a]) / (b - a)
        return float(cost_ms[b] + slope * (tree_tokens - b))
    return float(np.interp(tree_tokens, sizes, [cost_ms[s] for s in sizes]))


def plans_by_size(rates: Mapping[RankPath, float], cost_ms: Mapping[int, float], max_nodes: int) -> list[TreePlan]:
    """The best tree of every size from 0 (plain decoding) up to max_nodes draft nodes."""
    order = best_template(rates, max_nodes)  # best-first: each prefix is the best tree of its size
    gains = np.concatenate([[1.0], 1.0 + np.cumsum(path_probabilities(order, rates))])
    return [
        TreePlan(tuple(order[:size]), float(gains[size]), step_cost(cost_ms, size + 1))
        for size in range(len(order) + 1)
    ]


def choose_tree(rates: Mapping[RankPath, float], cost_ms: Mapping[int, float], max_nodes: int = 127) -> TreePlan:
    """The tree with the most expected tokens per second; the smallest among equals."""
    plans = plans_by_size(rates, cost_ms, max_nodes)
    best = max(plan.tokens_per_s for plan in plans)
    return next(plan for plan in plans if plan.tokens_per_s >= best * (1 - 1e-9))
