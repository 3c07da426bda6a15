"""Choosing among arms by the reward they return (UCB1 on rewards scaled to [0, 1])."""

from __future__ import annotations

import math


class UCB:
    """Upper confidence bound: play the arm whose mean reward plus exploration bonus is highest.

    Rewards are scaled by the largest seen so far, so any positive measure (tokens per second)
    works. `fading` < 1 lets old rewards count less, for rewards that drift."""

    def __init__(self, arms: int, exploration: float = 0.5, fading: float = 1.0):
        self.exploration = exploration
        self.fading = fading
        self.plays = [0.0] * arms
        self.totals = [0.0] * arms
        self.scale = 0.0

    def choose(self) -> int:
        for arm, plays in enumerate(self.plays):
            if plays == 0:
                return arm
        rounds = sum(self.plays)
        return max(range(len(self.plays)), key=lambda arm: self._bound(arm, rounds))

    def update(self, arm: int, reward: float) -> None:
        self.scale = max(self.scale, reward)
        if self.fading < 1.0:
            self.plays = [p * self.fading for p in self.plays]
            self.totals = [t * self.fading for t in self.totals]
        self.plays[arm] += 1
        self.totals[arm] += reward

    def mean(self, arm: int) -> float:
        return self.totals[arm] / self.plays[arm] if self.plays[arm] else 0.0

    def _bound(self, arm: int, rounds: float) -> float:
        scaled = self.mean(arm) / self.scale if self.scale > 0 else 0.0
        return scaled + self.exploration * math.sqrt(2 * math.log(rounds) / self.plays[arm])
