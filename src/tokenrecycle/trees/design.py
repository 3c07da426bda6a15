"""Template design: grow templates best-first and choose the tree that maximises expected tokens per second on this machine (pure).

Two measurements go in: the runner's cost curve T(n), milliseconds for one forward pass of n tree
tokens (the root included), and per rank path the rate at which its node was accepted when its
parent was. Under greedy verification a node is accepted only if every ancestor was, so the
expected number of tokens one step decides is 1 (the bonus token) plus, over the tree's nodes, the
product of the rates along each node's path. For a given size, best-first growth from the root
(`best_template` below) maximises that sum, because a path is never more likely than its prefix;
the size is then the one with the highest expected tokens / T(size + 1).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .structure import RankPath


def grow_template(rank_accept: Sequence[float], nodes_per_depth: Sequence[int]) -> list[RankPath]:
    """Build a template level by level, keeping at each depth the children most likely accepted.

    rank_accept[r] is an assumed probability that a rank-r candidate is the one accepted; a path's
    value is the product over its ranks. Used to generate the shipped templates (see trees/templates.py).
    """
    chosen: list[tuple[float, RankPath]] = [(1.0, ())]
    template: list[RankPath] = []
    for quota in nodes_per_depth:
        candidates = [
            (-value * p, path + (rank,)) for value, path in chosen for rank, p in enumerate(rank_accept)
        ]
        best = heapq.nsmallest(quota, candidates)
        chosen = [(-neg, path) for neg, path in best]
        template.extend(path for _, path in chosen)
    return template


def rank_budget_template(max_depth: int, rank_budget: int, topk: int) -> list[RankPath]:
    """Every path of up to max_depth whose ranks sum to at most rank_budget, plus every rank at
    depths 1 and 2 (after rank 0): a wide, deep superset to choose dynamic trees from."""
    paths = {(r,) for r in range(topk)} | {(r, 0) for r in range(topk)}
    frontier: list[RankPath] = [()]
    for _ in range(max_depth):
        frontier = [p + (r,) for p in frontier for r in range(min(rank_budget, topk - 1) + 1) if sum(p) + r <= rank_budget]
        paths.update(frontier)
    return sorted(paths, key=lambda p: (len(p), p))


def best_template(accept_rate: dict[RankPath, float], num_nodes: int) -> list[RankPath]:
    """The num_nodes paths with the highest chance of being accepted (pure).

    accept_rate[path] is how often the node at `path` was accepted when its parent was; a path's
    chance is the product of the rates along it, so expanding best-first from the root keeps the
    result prefix-closed. Paths with no rate are never chosen.
    """
    children: dict[RankPath, list[RankPath]] = {}
    for path in accept_rate:
        children.setdefault(path[:-1], []).append(path)
    frontier = [(-accept_rate[path], path) for path in children.get((), [])]
    heapq.heapify(frontier)
    chosen: list[RankPath] = []
    while frontier and len(chosen) < num_nodes:
        neg_value, path = heapq.heappop(frontier)
        chosen.append(path)
        for child in children.get(path, []):
            heapq.heappush(frontier, (neg_value * accept_rate[child], child))
    return chosen


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
