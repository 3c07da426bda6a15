"""Greedy verification of a draft tree (pure)."""

from __future__ import annotations

import numpy as np
import torch

from .trees import DraftTree


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[np.ndarray, int]:
    """Longest root-to-node path whose every token is the model's argmax after its parent.

    Returns the accepted node indices (root first) and the bonus token: the model's own argmax
    after the last accepted node. Siblings hold distinct tokens, so at most one node per depth
    can be on the accepted path.
    """
    predicted = logits.argmax(dim=-1).cpu().numpy()
    matches = np.ones(len(tree), dtype=bool)
    matches[1:] = tree.tokens[1:] == predicted[tree.parents[1:]]
    on_path = ~(tree.ancestor_mask & ~matches[None, :]).any(axis=1)
    candidates = np.flatnonzero(on_path)
    last = int(candidates[np.argmax(tree.depths[candidates])])
    return tree.path_to(last), int(predicted[last])
