"""The one interface between the decoding loop and a model."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..trees import DraftTree


class ModelRunner(ABC):
    """Owns a model and its KV cache for one sequence at a time.

    The loop calls `prefill` once per request, then repeats `forward_tree` and `commit`. After a
    commit the cache holds exactly the tokens decided so far, as if they had been decoded one by one.
    """

    vocab_size: int
    max_context: int

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, reserve: int = 0) -> torch.Tensor:
        """Start a new sequence: run the prompt, cache it, return float32 logits (prompt_len, vocab).

        `reserve` is how many tokens the caller may still decide; a runner can size its cache once.
        """

    @abstractmethod
    def forward_tree(self, tree: DraftTree) -> torch.Tensor:
        """Run a tree on top of the cache, return float32 logits (len(tree), vocab).

        Node i sits at position cache_length + depth[i] and attends to the cache, its ancestors and
        itself. The tree's keys and values stay pending until `commit`.
        """

    @abstractmethod
    def commit(self, accepted: np.ndarray) -> None:
        """Keep the pending nodes listed in `accepted` (a root-to-node path, root first), drop the rest."""

    @property
    @abstractmethod
    def cache_length(self) -> int:
        """Tokens committed to the cache."""


def additive_mask(visible: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An attention bias from a visibility matrix: 0 where a key is visible, the dtype's most
    negative value where it is not (not -inf, so no softmax row can turn into NaN)."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(visible), torch.finfo(dtype).min)
    return mask.to(device)
