"""No drafting: one token per forward pass. Plain decoding on the same runner, as a baseline."""

from __future__ import annotations

import numpy as np
import torch

from ..trees import DraftTree, chain_tree
from .base import Drafter


class PlainDrafter(Drafter):
    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        pass

    def propose(self, root_token: int) -> DraftTree:
        return chain_tree([root_token])

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        pass
