"""The drafter interface: propose a tree from the last decided token, learn from verified logits."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..sampling import Draws, Sampling
from ..trees import DraftTree


class Drafter(ABC):
    # Whether several requests may use this one object at once (its state is not one text's).
    shareable: bool = False

    def prepare(self, sampling: Sampling | None, draws: Draws | None) -> None:
        """Told, before a request starts, how its tokens will be decided: None for greedy, or the
        sampling settings and the request's draws. Drafters that sample their drafts need it."""

    @abstractmethod
    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        """A new request begins; the prompt's prefill logits are offered for seeding."""

    @abstractmethod
    def propose(self, root_token: int) -> DraftTree:
        """A tree whose root is `root_token`, the last token already decided."""

    def finish(self) -> None:
        """The request ended (finished or cancelled): give back what it held, such as a runner slot."""

    @abstractmethod
    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        """The target model's logits for every node of `tree`; `accepted` is the kept path."""

    @property
    def evidence(self) -> int:
        """How much the text at hand backs this drafter's last proposal, as a small bucket (0: not
        at all); the auto drafter chooses its mix per combination of these. Copying drafters
        report how long a suffix of the text they matched."""
        return 0

    @property
    def memory_bytes(self) -> int:
        """Extra state this drafter keeps, in bytes."""
        return 0
