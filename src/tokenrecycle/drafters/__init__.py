"""Drafters: each proposes a tree from the last decided token and observes the verified logits."""

from .base import Drafter
from .recycling import TokenRecyclingDrafter

__all__ = ["Drafter", "TokenRecyclingDrafter"]
