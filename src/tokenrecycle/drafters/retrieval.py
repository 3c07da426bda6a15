"""Retrieval drafting (REST / SAM-Decoding style): the most frequent continuations of the text's
longest suffix found in a datastore, grown best first into a tree.

The datastore is a suffix automaton over an optional corpus (indexed once into a file), the
prompts of this drafter's requests and the outputs of its earlier requests. Matching follows the
text token by token in constant amortised time; where the longest match has no continuation, a
shorter one (its suffix link) is used.
"""

from __future__ import annotations

import numpy as np
import torch

from ..suffix_automaton import SuffixAutomaton
from ..trees import DraftTree
from .base import Drafter
from .lookup import merge_branches


class RetrievalDrafter(Drafter):
    def __init__(self, datastore: SuffixAutomaton | None = None, budget: int = 16, depth: int = 6, learn: bool = True):
        """learn: add each request's prompt and output to the datastore (for later requests)."""
        self.automaton = datastore if datastore is not None else SuffixAutomaton()
        self.budget, self.depth, self.learn = budget, depth, learn
        self._output: list[int] = []
        self._state, self._matched = 0, 0
        self.continued = 0  # length of the suffix the last proposal continued

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        if self.learn:
            if self._output:
                self.automaton.add_document(self._output)
            self.automaton.add_document(prompt_ids)
        self._output = []
        self._state, self._matched = 0, 0
        for token in prompt_ids:
            self._follow(int(token))

    def propose(self, root_token: int) -> DraftTree:
        self._follow(root_token)
        self._output.append(root_token)
        state = self._state
        while state > 0 and not self._has_continuation(state):
            state = self.automaton.link[state]
        self.continued = min(self._matched, self.automaton.length[state]) if state > 0 else 0
        branches = [tokens for tokens, _ in self.automaton.continuations(state, self.budget, self.depth)] if state > 0 else []
        return merge_branches(root_token, branches, self.budget)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        for token in tree.tokens[accepted[1:]].tolist():
            self._follow(token)
            self._output.append(token)

    @property
    def evidence(self) -> int:
        """0 below 4 matched tokens, 1 below 8, else 2: one or two common tokens say little."""
        return min(self.continued, 8) // 4

    @property
    def memory_bytes(self) -> int:
        transitions = sum(len(n) for n in self.automaton.next)
        return 120 * transitions + 40 * len(self.automaton.length)  # Python dicts and lists, roughly

    def _follow(self, token: int) -> None:
        self._state, self._matched = self.automaton.step(self._state, self._matched, token)

    def _has_continuation(self, state: int) -> bool:
        return any(token >= 0 for token in self.automaton.next[state])
