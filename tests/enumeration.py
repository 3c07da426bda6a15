"""Exact output distributions of the decoding loop, by replaying every outcome of its draws.

Every random choice the loop makes goes through `draws.draw(probs)`. Replaying every possible
sequence of outcomes (depth-first, multiplying their probabilities) gives the exact distribution
of the output: no sampling noise, so a 1e-9 difference is a real one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from fakes import decode_alone


class Branch(Exception):
    def __init__(self, probs):
        self.probs = probs


class ReplayedDraws:
    """Gives the outcomes of a script in turn; past its end, asks the enumerator to branch."""

    def __init__(self, script):
        self.script = script
        self.used = 0
        self.probability = 1.0

    def draw(self, probs: torch.Tensor) -> int:
        if self.used == len(self.script):
            raise Branch(probs)
        outcome = self.script[self.used]
        self.used += 1
        self.probability *= float(probs[outcome])
        return outcome


def output_distribution(make_runner, make_drafter, make_verifier, prompt: np.ndarray, tokens: int) -> dict[tuple, float]:
    """Exact distribution of the first `tokens` tokens, over every sequence of draw outcomes."""
    distribution: dict[tuple, float] = defaultdict(float)
    scripts = [[]]
    while scripts:
        script = scripts.pop()
        draws = ReplayedDraws(script)
        try:
            out = []
            for step in decode_alone(make_runner(), make_drafter(), prompt, tokens, make_verifier(draws)):
                out += step.tokens
            distribution[tuple(out[:tokens])] += draws.probability
        except Branch as branch:
            scripts += [script + [int(x)] for x in np.flatnonzero(branch.probs.float().numpy() > 0)]
    return distribution
