"""Choosing among arms by the reward they return: Thompson sampling, one bandit per context."""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np


class ThompsonSampling:
    """Gaussian Thompson sampling: each arm's mean reward has a normal posterior (its sample mean,
    its sample variance over its plays); every choice draws once from each posterior and plays the
    highest draw, so an arm is explored in proportion to the chance that it is the best.

    Works for any real reward (tokens per second) without scaling. `fading` < 1 lets old rewards
    count less, for rewards that drift; it caps the evidence at 1 / (1 - fading) plays."""

    FORCED_PLAYS = 2  # each arm's variance needs two rewards before its posterior means anything

    def __init__(self, arms: int, fading: float = 1.0, rng: np.random.Generator | None = None):
        if arms < 1 or not 0.0 < fading <= 1.0:
            raise ValueError(f"need at least one arm and 0 < fading <= 1, got {arms} and {fading}")
        self.fading = fading
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.plays = [0.0] * arms
        self.totals = [0.0] * arms
        self.squares = [0.0] * arms

    def choose(self) -> int:
        for arm, plays in enumerate(self.plays):
            if plays < self.FORCED_PLAYS:
                return arm
        draws = [self.rng.normal(self.mean(arm), math.sqrt(self.variance(arm) / self.plays[arm])) for arm in range(len(self.plays))]
        return int(np.argmax(draws))

    def update(self, arm: int, reward: float) -> None:
        if self.fading < 1.0:
            for sums in (self.plays, self.totals, self.squares):
                sums[:] = [value * self.fading for value in sums]
        self.plays[arm] += 1
        self.totals[arm] += reward
        self.squares[arm] += reward * reward

    def mean(self, arm: int) -> float:
        return self.totals[arm] / self.plays[arm] if self.plays[arm] else 0.0

    def variance(self, arm: int) -> float:
        """The arm's sample variance, floored at a thousandth of its squared mean (two equal rewards
        must not make it certain)."""
        plays, mean = self.plays[arm], self.mean(arm)
        spread = max(self.squares[arm] - plays * mean * mean, 0.0) / max(plays - 1, 1e-9)
        return max(spread, 1e-3 * mean * mean, 1e-12)


class ContextualBandit:
    """A Thompson sampler per context (any hashable description of the situation), each made on
    first sight: what is best when the text repeats the prompt need not be best when it does not."""

    def __init__(self, arms: int, fading: float = 1.0, seed: int = 0):
        self.arms, self.fading = arms, fading
        self.rng = np.random.default_rng(seed)
        self.by_context: dict[Hashable, ThompsonSampling] = {}

    def choose(self, context: Hashable) -> int:
        return self._bandit(context).choose()

    def update(self, context: Hashable, arm: int, reward: float) -> None:
        self._bandit(context).update(arm, reward)

    def _bandit(self, context: Hashable) -> ThompsonSampling:
        if context not in self.by_context:
            self.by_context[context] = ThompsonSampling(self.arms, self.fading, self.rng)
        return self.by_context[context]
