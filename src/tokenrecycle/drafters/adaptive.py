"""Token Recycling with a tree that follows the acceptance of the text being written.

The tuning profile gives, per rank path, how often a node is accepted when its parent is, and the
cost of each tree size on this machine. Here those rates are only the prior: every verified step
also counts, per path offered with its parent accepted, whether it was accepted, with older steps
fading. Every few steps the tree is chosen again from the blended rates and the same cost curve,
so repetitive text (long chains accepted) grows a deeper tree and free text shrinks it, never
beyond what the cost curve says pays.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..trees.design import choose_tree
from ..trees import DraftTree, RankPath, compile_template, offered_nodes, trim_to_topk
from .recycling import TokenRecyclingDrafter


class AdaptiveTreeDrafter(TokenRecyclingDrafter):
    shareable = False  # its tree follows one request's acceptance
    def __init__(
        self,
        vocab_size: int,
        prior_rates: Mapping[RankPath, float],
        cost_ms: Mapping[int, float],
        topk: int = 8,
        hot_start: bool = True,
        every: int = 8,  # steps between re-choices
        prior_weight: float = 16.0,  # the profile counts as this many observed visits per path
        fading: float = 0.95,  # per step: about the last 20 steps matter
    ):
        self.paths = trim_to_topk(prior_rates, topk)
        self.index = {path: i for i, path in enumerate(self.paths)}
        self.prior = np.array([prior_rates[p] for p in self.paths], dtype=np.float64)
        self.cost_ms = dict(cost_ms)
        self.every, self.prior_weight, self.fading = every, prior_weight, fading
        self.max_nodes = max(self.cost_ms) - 1
        self.topk = topk  # before the parent's constructor: the first tree needs it
        self._forget()
        super().__init__(vocab_size, self._choose(), topk, hot_start)

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        """Each request starts from the profile's tree and adapts to its own text."""
        self._forget()
        self.template = self._choose()
        super().start(prompt_ids, prompt_logits)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        super().observe(tree, logits, accepted)
        self._count(tree, accepted)
        self.steps += 1
        if self.steps % self.every == 0:
            self.template = self._choose()

    def rates(self) -> dict[RankPath, float]:
        """The prior blended with what this request has shown so far."""
        blended = (self.hits + self.prior_weight * self.prior) / (self.visits + self.prior_weight)
        return dict(zip(self.paths, blended.tolist()))

    def _forget(self) -> None:
        self.hits = np.zeros(len(self.paths))
        self.visits = np.zeros(len(self.paths))
        self.steps = 0

    def _count(self, tree: DraftTree, accepted: np.ndarray) -> None:
        self.hits *= self.fading
        self.visits *= self.fading
        offered, hit = offered_nodes(tree, accepted)
        rows = [self.index[self.template.paths[tree.source[node]]] for node in offered]
        np.add.at(self.visits, rows, 1.0)
        np.add.at(self.hits, rows, hit.astype(np.float64))

    def _choose(self):
        plan = choose_tree(self.rates(), self.cost_ms, self.max_nodes)
        return compile_template(list(plan.paths), self.topk)
