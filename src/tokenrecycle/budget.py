"""The batch's tree budget: how many draft nodes each request verifies in a shared forward pass.

The rule. A pass over N tokens costs c(N) seconds (the measured cost curve: flat for a few tokens
on a CPU, then rising). Each running request must feed its root (the token it decided last), so
the pass holds R roots plus any prompt chunks; every draft node added on top buys that request its
chance of acceptance, estimated as the product of the conditional acceptance rates along the node's
path (so a child is never worth more than its parent). The batch's expected output per pass is
R plus the sum of the chosen nodes' chances, so the engine takes the nodes with the highest chances
across all requests, as many as maximise expected tokens per second:

    choose K to maximise  (R + g_1 + ... + g_K) / c(fixed + R + K),  g sorted from high to low,

within the step's token bound. Taking nodes by chance keeps each request's chosen set closed under
parents, so it is a valid tree; a request whose drafts are not being accepted ends up with a small
tree or its root alone.

The conditional rates are kept per request and per node (a node is named by where its drafter grew
it from, `DraftTree.source`), blended with the rates over all requests so a new request starts from
what the others showed. The cost curve starts from the tuning profile where there is one (else a
generic shape) and follows the steps the engine times (the pass, drafting and verification).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .trees import DraftTree, offered_nodes, prune

PRIOR_RATE = 0.3  # a node's conditional acceptance before anything was seen
PRIOR_WEIGHT = 4.0  # how many observations the blend's prior counts for
COST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
COST_SMOOTHING = 0.2  # weight of a new timing in its bucket's running mean
DEFAULT_SLOPE = 0.05  # the generic curve's cost per extra token, relative to a one-token pass


class AcceptanceRates:
    """Conditional acceptance (accepted when offered: the parent was accepted) per node key,
    blended with a prior: another AcceptanceRates (all requests) or a constant."""

    def __init__(self, prior: "AcceptanceRates | None" = None):
        self.prior = prior
        self.offered: dict[int, int] = {}
        self.accepted: dict[int, int] = {}

    def observe(self, tree: DraftTree, accepted: np.ndarray) -> None:
        """Count which nodes had their chance in a verified tree and which were accepted."""
        offered, kept = offered_nodes(tree, accepted)
        for key, hit in zip(tree.source[offered].tolist(), kept.tolist()):
            self.offered[key] = self.offered.get(key, 0) + 1
            self.accepted[key] = self.accepted.get(key, 0) + hit
        if self.prior is not None:
            self.prior.observe(tree, accepted)

    def rate(self, key: int) -> float:
        prior = PRIOR_RATE if self.prior is None else self.prior.rate(key)
        offered = self.offered.get(key, 0)
        return (self.accepted.get(key, 0) + PRIOR_WEIGHT * prior) / (offered + PRIOR_WEIGHT)

    def chances(self, tree: DraftTree) -> np.ndarray:
        """Each node's estimated chance of being accepted (the root's is 1)."""
        chances = np.ones(len(tree))
        for node in range(1, len(tree)):  # parents precede children
            chances[node] = chances[tree.parents[node]] * self.rate(int(tree.source[node]))
        return chances


class PassCost:
    """Seconds of a forward pass by the number of tokens in it: running means of the timed passes
    in power-of-two buckets, interpolated; buckets not yet timed follow the prior curve, scaled to
    the nearest timed bucket."""

    def __init__(self, prior_ms: Mapping[int, float] | None = None):
        points = sorted(prior_ms.items()) if prior_ms else [(1, 1.0), (64, 1.0 + 63 * DEFAULT_SLOPE)]
        self._prior_x = np.array([p[0] for p in points], dtype=float)
        self._prior_y = np.array([p[1] for p in points], dtype=float)
        self._timed: dict[int, float] = {}

    def observe(self, tokens: int, seconds: float) -> None:
        bucket = _bucket(tokens)
        old = self._timed.get(bucket)
        self._timed[bucket] = seconds if old is None else (1 - COST_SMOOTHING) * old + COST_SMOOTHING * seconds

    def prior(self, tokens: np.ndarray) -> np.ndarray:
        """The prior curve, extended linearly past its last point."""
        x, y = self._prior_x, self._prior_y
        inside = np.interp(tokens, x, y)
        if len(x) < 2:
            return inside
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.where(tokens > x[-1], y[-1] + slope * (tokens - x[-1]), inside)

    def __call__(self, tokens: np.ndarray | int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=float)
        if not self._timed:
            return self.prior(tokens)
        timed_x = np.array(sorted(self._timed), dtype=float)
        timed_y = np.array([self._timed[int(b)] for b in timed_x])
        # Where nothing was timed, the prior's shape scaled to the nearest timed bucket.
        nearest = timed_x[np.abs(timed_x[None, :] - tokens.reshape(-1, 1)).argmin(axis=1)].reshape(tokens.shape)
        scale = np.interp(nearest, timed_x, timed_y) / self.prior(nearest)
        inside = (tokens >= timed_x[0]) & (tokens <= timed_x[-1])
        return np.where(inside, np.interp(tokens, timed_x, timed_y), self.prior(tokens) * scale)


def _bucket(tokens: int) -> int:
    return int(COST_BUCKETS[min(np.searchsorted(COST_BUCKETS, tokens), len(COST_BUCKETS) - 1)])


def allocate(chances: Sequence[np.ndarray], fixed_tokens: int, cost, max_tokens: int) -> list[np.ndarray]:
    """Which nodes of each tree to verify (pure): a boolean mask per tree, roots always kept.

    `chances[r]` holds tree r's node chances (root first); `fixed_tokens` are the pass's other
    tokens (prompt chunks); `cost(N)` is the pass cost for N tokens (vectorised); at most
    `max_tokens` tokens in the pass, roots and chunks included."""
    roots = len(chances)
    owner = np.concatenate([np.full(len(c) - 1, r) for r, c in enumerate(chances)] or [np.zeros(0, int)]).astype(int)
    node = np.concatenate([np.arange(1, len(c)) for c in chances] or [np.zeros(0, int)]).astype(int)
    gain = np.concatenate([c[1:] for c in chances] or [np.zeros(0)])
    order = np.lexsort((node, -gain))  # by chance; ties: parents (lower index) first
    room = max(0, min(len(order), max_tokens - fixed_tokens - roots))
    expected = roots + np.concatenate(([0.0], np.cumsum(gain[order][:room])))
    per_second = expected / cost(fixed_tokens + roots + np.arange(room + 1))
    best = int(np.argmax(per_second))
    masks = [np.zeros(len(c), dtype=bool) for c in chances]
    for mask in masks:
        mask[:1] = True
    for index in order[:best]:
        masks[owner[index]][node[index]] = True
    return masks


def equal_shares(sizes: Sequence[int], fixed_tokens: int, max_tokens: int) -> list[np.ndarray]:
    """The comparison rule: every tree whole, or, where the trees do not fit, the same number of
    nodes for each (its first nodes, in drafter order) (pure)."""
    room = max_tokens - fixed_tokens - len(sizes)
    if sum(size - 1 for size in sizes) <= room:
        return [np.ones(size, dtype=bool) for size in sizes]
    share = max(0, room) // max(1, len(sizes))
    return [np.arange(size) <= share for size in sizes]


def trim(tree: DraftTree, keep: np.ndarray) -> DraftTree:
    """The tree cut to the chosen nodes (the same object when all are kept)."""
    return tree if keep.all() else prune(tree, tree.tokens, keep)
