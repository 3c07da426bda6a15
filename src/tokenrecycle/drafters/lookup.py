"""Prompt lookup: draft by copying what followed earlier occurrences of the text's last tokens.

The index maps every n-gram of the text so far (prompt and decided tokens, n up to `max_ngram`)
to the positions right after its occurrences, newest last. It grows by the new n-grams of each
decided token only, so a step costs the same on a long prompt as on a short one. A proposal takes
the longest suffix of the text that occurred before, follows up to `candidates` of its most
recent occurrences for up to `depth` tokens each, and merges them into one tree (shared prefixes
once, each continuation a branch).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..errors import InvalidOptionError
from ..trees import DraftTree, tree_from_parents
from .base import Drafter


class NgramIndex:
    """Where each n-gram (1 <= n <= max_ngram) of a growing token sequence occurred."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> positions after it

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                self.after[tuple(self.tokens[end - n : end])].append(end)

    def continuations(self, min_ngram: int, count: int, depth: int) -> tuple[int, list[list[int]]]:
        """Up to `count` distinct continuations (at most `depth` tokens each) of the longest suffix
        (of at least `min_ngram` tokens) seen before, from its most recent earlier occurrences,
        with that suffix's length (0 and none when no suffix occurred before)."""
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), min_ngram - 1, -1):
            found: list[list[int]] = []
            for position in reversed(self.after.get(tuple(self.tokens[end - n :]), ())):
                if position >= end:  # the suffix itself
                    continue
                continuation = self.tokens[position : position + depth]
                if continuation and continuation not in found:
                    found.append(continuation)
                if len(found) == count:
                    break
            if found:
                return n, found
        return 0, []


class LookupDrafter(Drafter):
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, candidates: int = 3, depth: int = 6, budget: int = 16):
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidOptionError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if candidates < 1 or depth < 1 or budget < 1:
            raise InvalidOptionError("candidates, depth and budget must be at least 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.candidates, self.depth, self.budget = candidates, depth, budget
        self.index = NgramIndex(max_ngram)
        self.matched = 0  # length of the suffix the last proposal continued

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        self.index = NgramIndex(self.max_ngram)
        self.index.extend(prompt_ids)

    def propose(self, root_token: int) -> DraftTree:
        self.index.extend([root_token])
        self.matched, branches = self.index.continuations(self.min_ngram, self.candidates, self.depth)
        return merge_branches(root_token, branches, self.budget)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        self.index.extend(tree.tokens[accepted[1:]])

    @property
    def evidence(self) -> int:
        return self.matched

    @property
    def memory_bytes(self) -> int:
        positions = sum(len(p) for p in self.index.after.values())
        return 8 * (len(self.index.tokens) + positions) + 64 * len(self.index.after)


def merge_branches(root_token: int, branches: list[list[int]], budget: int) -> DraftTree:
    """One tree from token sequences that all start after the root: shared prefixes merged,
    branches taken in order until `budget` nodes (a later branch only adds its new nodes)."""
    tokens, parents = [root_token], [-1]
    child: dict[tuple[int, int], int] = {}
    for branch in branches:
        node = 0
        for token in branch:
            if (node, token) not in child:
                if len(tokens) - 1 >= budget:
                    break
                child[(node, token)] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child[(node, token)]
    return tree_from_parents(tokens, parents)
