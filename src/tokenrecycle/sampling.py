"""Sampling settings and the distribution they define, the same as transformers' sampling.

The logits pass through transformers' own warpers, in the order `generate` applies them:
temperature, top-k, top-p, min-p. So plain sampling here and `model.generate(do_sample=True, ...)`
with the same settings draw from the same distribution. As in transformers, top-k is 50 unless set
(0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import InvalidOptionError

DEFAULT_TOP_K = 50  # transformers' default


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise InvalidOptionError(f"temperature must be positive (greedy decoding is the default), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidOptionError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InvalidOptionError(f"min_p must be in [0, 1], got {self.min_p}")

    @classmethod
    def of(cls, temperature: float, top_k: int = DEFAULT_TOP_K, top_p: float = 1.0, min_p: float | None = None,
           seed: int | None = None) -> Sampling | None:  # fmt: skip
        """Settings as a user gives them: temperature 0 means greedy decoding (None), not sampling."""
        if temperature == 0:
            return None
        if not temperature > 0:
            raise InvalidOptionError(f"temperature must be 0 (greedy) or positive, got {temperature}")
        return cls(temperature, top_k, top_p, min_p, seed)

    def generate_options(self) -> dict:
        """The same settings for transformers' `model.generate`."""
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}

    @cached_property
    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings, in generate's order (built once: the
        verifier applies them at every depth of every step)."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        if self.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=self.min_p))
        return warpers

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution to sample from, for each row of logits (float32)."""
        scores = logits.float().reshape(-1, logits.shape[-1])
        scores = self.warpers(None, scores)
        return torch.softmax(scores, dim=-1).reshape(logits.shape)


class Draws:
    """Where random choices come from: a seeded torch generator. Tests substitute their own."""

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def draw(self, probs: torch.Tensor) -> int:
        """An index drawn from a probability vector (on any device: the draw itself is made on
        the CPU, so a seed gives the same sample wherever the model runs)."""
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def gumbel(self, n: int) -> torch.Tensor:
        """n independent standard Gumbel variables (float64)."""
        return -torch.log(torch.empty(n, dtype=torch.float64).exponential_(generator=self.generator))
