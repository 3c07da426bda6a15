"""Drafters: each proposes a tree from the last decided token and observes the verified logits."""

from .adaptive import AdaptiveTreeDrafter
from .base import Drafter
from .plain import PlainDrafter
from .recycling import TokenRecyclingDrafter

__all__ = ["AdaptiveTreeDrafter", "Drafter", "PlainDrafter", "TokenRecyclingDrafter"]
