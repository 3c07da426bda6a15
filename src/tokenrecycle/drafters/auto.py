"""Several train-free drafters in one tree, and a bandit that picks which to use.

Each step every drafter proposes (so each keeps its own state current); the chosen arm's drafters'
trees are merged under its node budget: shared prefixes once, duplicates dropped, each node
remembering who proposed it, so accepted tokens are credited per drafter. The verifier and the
runner see one ordinary tree. The bandit's reward is tokens decided per second of the step, so it
settles on what is fastest for the text at hand, within a request and across requests. It keeps
one posterior per context, the drafters' evidence for their proposals (how long a suffix the
copying drafters matched): copying pays where the text repeats, recycling where it does not.

Drafters whose drafts are drawn from a distribution (draft models) cannot be merged: their
verification rule differs.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..bandit import ContextualBandit
from ..errors import InvalidOptionError
from ..sampling import Draws, Sampling
from ..trees import DraftTree, tree_from_parents
from .base import Drafter

Arm = tuple[tuple[str, ...], int]  # (drafter names, node budget)


def merge_trees(root_token: int, trees: Sequence[DraftTree], budget: int) -> tuple[DraftTree, list[int]]:
    """One tree from several with the same root, until `budget` nodes; returns it and, per node,
    a bit mask of the trees holding it.

    The trees take turns, each adding its next node in its own order (its drafter's priority:
    a lookup continuation before the next, a template's likeliest paths first); a node another
    tree already added costs nothing and is credited to both."""
    tokens, parents, origin = [root_token], [-1], [(1 << len(trees)) - 1]
    merged_at: dict[tuple[int, int], int] = {}
    maps = [{0: 0} for _ in trees]  # each tree's node -> merged node
    cursors = [1] * len(trees)

    def add_next(k: int) -> bool:
        """Walk tree k on from its cursor, merging nodes already present, up to and including one
        new node while the budget allows; True if one was added."""
        tree = trees[k]
        while cursors[k] < len(tree):
            node = cursors[k]
            cursors[k] += 1
            parent = maps[k].get(int(tree.parents[node]))
            if parent is None:  # its parent did not fit
                continue
            key = (parent, int(tree.tokens[node]))
            added = key not in merged_at
            if added:
                if len(tokens) - 1 >= budget:
                    continue
                merged_at[key] = len(tokens)
                tokens.append(key[1])
                parents.append(parent)
                origin.append(0)
            origin[merged_at[key]] |= 1 << k
            maps[k][node] = merged_at[key]
            if added:
                return True
        return False

    growing = list(range(len(trees)))
    while growing:
        growing = [k for k in growing if add_next(k)]
    return tree_from_parents(tokens, parents), origin


class AutoDrafter(Drafter):
    def __init__(self, drafters: dict[str, Drafter], arms: Sequence[Arm], adapt: bool = True, bandit: ContextualBandit | None = None):
        """adapt=False always plays the first arm (a fixed merged tree)."""
        unknown = {name for names, _ in arms for name in names} - set(drafters)
        if not arms or unknown:
            raise InvalidOptionError(f"every arm needs known drafters; unknown: {sorted(unknown)}")
        self.drafters = dict(drafters)
        self.arms = [(tuple(names), int(budget)) for names, budget in arms]
        self.adapt = adapt
        # Slow fading: the same evidence means a little less after a change of subject.
        self.bandit = bandit or ContextualBandit(len(self.arms), fading=0.998)
        self.credit = {name: 0 for name in drafters}  # accepted draft tokens each drafter had proposed
        self.plays_by_context: dict[tuple[int, ...], list[int]] = {}  # context -> plays of each arm
        self._arm, self._context = 0, ()
        self._origin: list[int] = []
        self._step_started: float | None = None
        self._decided = 0

    def prepare(self, sampling: Sampling | None, draws: Draws | None) -> None:
        for drafter in self.drafters.values():
            drafter.prepare(sampling, draws)

    def finish(self) -> None:
        for drafter in self.drafters.values():
            drafter.finish()

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        for drafter in self.drafters.values():
            drafter.start(prompt_ids, prompt_logits)
        self._step_started = None

    def propose(self, root_token: int) -> DraftTree:
        now = time.perf_counter()
        self._reward_last_step(now)
        self._step_started = now  # a step runs from one proposal to the next: drafting included
        trees = {name: drafter.propose(root_token) for name, drafter in self.drafters.items()}
        self._context = tuple(drafter.evidence for drafter in self.drafters.values())
        self._arm = self.bandit.choose(self._context) if self.adapt else 0
        self.plays_by_context.setdefault(self._context, [0] * len(self.arms))[self._arm] += 1
        names, budget = self.arms[self._arm]
        tree, self._origin = merge_trees(root_token, [trees[name] for name in names], budget)
        return tree

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        for drafter in self.drafters.values():
            drafter.observe(tree, logits, accepted)
        names = self.arms[self._arm][0]
        for node in accepted[1:]:
            for k, name in enumerate(names):
                if self._origin[node] >> k & 1:
                    self.credit[name] += 1
        self._decided = len(accepted)  # accepted drafts and the bonus token

    @property
    def plays(self) -> list[int]:
        """How often each arm was played, over all contexts."""
        return [sum(column) for column in zip(*self.plays_by_context.values())] or [0] * len(self.arms)

    @property
    def arm_names(self) -> list[str]:
        return ["+".join(names) + f"/{budget}" for names, budget in self.arms]

    def favourites(self) -> dict[str, str]:
        """Per context seen (each drafter's evidence), the arm played most there and its share."""
        found = {}
        for context, plays in sorted(self.plays_by_context.items()):
            label = " ".join(f"{name}={evidence}" for name, evidence in zip(self.drafters, context))
            best = int(np.argmax(plays))
            found[label] = f"{self.arm_names[best]} {plays[best]}/{sum(plays)}"
        return found

    @property
    def memory_bytes(self) -> int:
        return sum(drafter.memory_bytes for drafter in self.drafters.values())

    def _reward_last_step(self, now: float) -> None:
        """Tokens per second of the step that just ended (drafting, forward, verification)."""
        if self._step_started is not None and self.adapt:
            self.bandit.update(self._context, self._arm, self._decided / max(now - self._step_started, 1e-6))
