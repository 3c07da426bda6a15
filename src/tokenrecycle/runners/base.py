"""The one interface between the decoding loop and a model: KV-cache slots, one sequence each."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InvalidOptionError, NoFreeSlotError
from ..trees import DraftTree

DEFAULT_SLOTS = 4  # sequences a runner holds at once unless told otherwise


class RunnerKind(enum.Enum):
    FAST = "fast"  # tokenrecycle's own decoder loop over a preallocated cache
    HF = "hf"  # the model's own transformers forward


class Loop(enum.Enum):
    """How a runner runs its decoder layers."""

    CPP = "C++ loop"
    CUDA_GRAPHS = "CUDA graph per step"
    PYTHON = "Python loop"
    TRANSFORMERS = "transformers forward"


class ModelRunner(ABC):
    """Owns a model and the KV caches of up to `max_slots` sequences.

    A request takes a slot with `allocate`, calls `prefill` once, then repeats `forward_tree` and
    `commit` on that slot, and gives it back with `release`. After a commit the slot's cache holds
    exactly the tokens decided so far, as if they had been decoded one by one. A slot's cache is
    kept after release (reallocated only to grow) and overwritten by the next prefill.
    """

    vocab_size: int
    max_context: int
    kind: RunnerKind
    loop: Loop
    loop_note: str | None = None  # why the loop is not the fastest one (a failed C++ build, ...)
    kernel: str | None = None  # the quantised weights' matrix kernel: its cost curve is the runner's
    device: torch.device = torch.device("cpu")  # where the model, its caches and masks live
    batches: bool = False  # whether forward_batch runs several slots in one pass (else one after another)

    def __init__(self, max_slots: int = DEFAULT_SLOTS):
        check_slots(max_slots)
        self.max_slots = max_slots
        self._free = list(range(max_slots))
        self._busy: set[int] = set()

    # ---- slots -----------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free slot for a new sequence (the lowest-numbered one)."""
        if not self._free:
            raise NoFreeSlotError(f"all {self.max_slots} KV-cache slots are in use")
        slot = self._free.pop(0)
        self._busy.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back; its cache rows are overwritten by the next sequence's prefill."""
        self._check_slot(slot)
        self._busy.remove(slot)
        self._free.append(slot)
        self._free.sort()

    @contextmanager
    def borrowed_slot(self) -> Iterator[int]:
        """A slot for the length of a `with` block (measurements, calibration, tests)."""
        slot = self.allocate()
        try:
            yield slot
        finally:
            self.release(slot)

    def _check_slot(self, slot: int) -> None:
        if slot not in self._busy:
            raise ValueError(f"slot {slot} is not allocated")

    # ---- one sequence ----------------------------------------------------------------------
    @abstractmethod
    def prefill(self, slot: int, input_ids: np.ndarray, reserve: int = 0) -> torch.Tensor:
        """Start a new sequence in `slot`: run the prompt, cache it, return float32 logits
        (prompt_len, vocab). `reserve` is how many tokens the caller may still decide; a runner
        can size the slot's cache once."""

    @abstractmethod
    def forward_tree(self, slot: int, tree: DraftTree) -> torch.Tensor:
        """Run a tree on top of the slot's cache, return float32 logits (len(tree), vocab).

        Node i sits at position cache_length + depth[i] and attends to the slot's cache, its
        ancestors and itself. The tree's keys and values stay pending until `commit`.
        """

    def forward_batch(self, items: Sequence[tuple[int, DraftTree]]) -> list[torch.Tensor]:
        """`forward_tree` for several (slot, tree) pairs, each slot at most once; one list of
        logits per pair. Runners that batch run them as one pass; this one runs them in turn."""
        return [self.forward_tree(slot, tree) for slot, tree in items]

    def begin(self, slot: int, tokens: int) -> None:
        """Empty the slot's cache and size it for `tokens` tokens, for a prompt fed in chunks as
        chain trees (forward_tree, then commit of the whole chain). Runners that batch have it."""
        raise NotImplementedError(f"the {self.kind.value} runner prefills a prompt in one call")

    @abstractmethod
    def commit(self, slot: int, accepted: np.ndarray) -> None:
        """Keep the pending nodes listed in `accepted` (a root-to-node path, root first), drop the rest."""

    @abstractmethod
    def cache_length(self, slot: int) -> int:
        """Tokens committed to the slot's cache."""

    @property
    @abstractmethod
    def cache_bytes(self) -> int:
        """Memory held by the KV caches of every slot."""


def check_slots(max_slots: int) -> None:
    if not isinstance(max_slots, int) or isinstance(max_slots, bool) or max_slots < 1:
        raise InvalidOptionError(f"max_slots must be a whole number of at least 1, got {max_slots!r}")


def additive_mask(visible: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An attention bias from a visibility matrix: 0 where a key is visible, the dtype's most
    negative value where it is not (not -inf, so no softmax row can turn into NaN)."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(visible), torch.finfo(dtype).min)
    return mask.to(device)
