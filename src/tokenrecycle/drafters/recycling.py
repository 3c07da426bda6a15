"""Token Recycling: draft from the model's own top-k candidates seen at earlier steps.

A V x k table holds, for each token t, the k tokens the model ranked highest the last time it
processed t. Drafting grows a template level by level with one gather per depth; every verified
node, rejected ones included, rewrites its token's row.

With a node budget the table also keeps each candidate's probability (float16), the template is
grown in full and only the `budget` nodes with the most probable root-to-node paths are verified:
a dynamic tree that goes deep where the model was confident and wide where it was not.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import CorruptTableError, InvalidOptionError
from ..files import atomic_write
from ..trees import CompiledTree, DraftTree, first_of_each_sibling_token, prune
from .base import Drafter

UNWRITTEN = -1  # a row never written drafts nothing


def check_topk(topk: int) -> None:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise InvalidOptionError(f"topk must be a whole number of at least 1, got {topk!r}")


class TokenRecyclingDrafter(Drafter):
    def __init__(
        self,
        vocab_size: int,
        template: CompiledTree,
        topk: int = 8,
        hot_start: bool = True,
        budget: int | None = None,
    ):
        check_topk(topk)
        if template.num_nodes and int(template.ranks.max()) >= topk:
            raise InvalidOptionError(f"the tree uses rank {int(template.ranks.max())}, beyond topk={topk}")
        self.vocab_size = vocab_size
        self.topk = topk
        self.template = template
        self.hot_start = hot_start
        if budget is not None and budget < 1:
            raise InvalidOptionError(f"the node budget must be at least 1, got {budget}")
        self.budget = budget
        self.table = np.full((vocab_size, topk), UNWRITTEN, dtype=np.int32)
        self.probs = np.zeros((vocab_size, topk), dtype=np.float16) if budget else None
        self.writes = 0  # counts changes, so a saved copy that is still current is not written again

    @property
    def shareable(self) -> bool:
        """A hot table is all the state there is: requests running at once can share it."""
        return self.hot_start

    @property
    def memory_bytes(self) -> int:
        return int(self.table.nbytes) + (int(self.probs.nbytes) if self.probs is not None else 0)

    def reset(self) -> None:
        self.table.fill(UNWRITTEN)
        if self.probs is not None:
            self.probs.fill(0)
        self.writes += 1

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        if not self.hot_start:
            self.reset()
        self._write(np.asarray(prompt_ids), prompt_logits)

    def propose(self, root_token: int) -> DraftTree:
        template = self.template
        tokens = np.empty(len(template.paths), dtype=np.int64)
        tokens[0] = root_token
        for start, end in template.level_bounds:
            parent_tokens = tokens[template.parents[start:end]]
            rows = self.table[np.maximum(parent_tokens, 0), template.ranks[start:end]]
            tokens[start:end] = np.where(parent_tokens >= 0, rows, UNWRITTEN)
        keep = (tokens >= 0) & first_of_each_sibling_token(template.parents, np.maximum(tokens, 0))
        if self.budget is not None:
            keep &= self._most_probable(tokens, keep)
        return prune(template, tokens, keep)

    def _most_probable(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Mask of the root and the `budget` valid nodes whose paths are most probable."""
        template = self.template
        path_prob = np.zeros(len(tokens), dtype=np.float32)
        path_prob[0] = 1.0
        for start, end in template.level_bounds:
            parents = template.parents[start:end]
            step = self.probs[np.maximum(tokens[parents], 0), template.ranks[start:end]]
            path_prob[start:end] = np.where(valid[start:end], path_prob[parents] * step, 0.0)
        # Best first; at equal probability the shallower node first, so a parent precedes its child.
        order = np.lexsort((template.depths[1:], -path_prob[1:])) + 1
        keep = np.zeros(len(tokens), dtype=bool)
        keep[0] = True
        keep[order[: self.budget]] = True
        return keep & (path_prob > 0)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        rows, probs = self._candidates(logits)
        self._store(tree.tokens, rows, probs)
        # A token can sit at several nodes; the row from its accepted context should win.
        self._store(tree.tokens[accepted], rows[accepted], None if probs is None else probs[accepted])

    def _write(self, tokens: np.ndarray, logits: torch.Tensor) -> None:
        self._store(tokens, *self._candidates(logits))

    def _candidates(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's top-k token ids and, when a budget needs them, their probabilities."""
        top = torch.topk(logits, self.topk, dim=-1)
        rows = top.indices.to(torch.int32).cpu().numpy()
        if self.probs is None:
            return rows, None
        probs = torch.exp(top.values - torch.logsumexp(logits, dim=-1, keepdim=True))
        return rows, probs.to(torch.float16).cpu().numpy()

    def _store(self, tokens: np.ndarray, rows: np.ndarray, probs: np.ndarray | None) -> None:
        self.table[tokens] = rows
        if probs is not None:
            self.probs[tokens] = probs
        self.writes += 1

    def save(self, path: str | os.PathLike) -> None:
        """Write the table atomically: a crash leaves the old file or none, never half of one."""
        extra = {"probs": self.probs} if self.probs is not None else {}
        with atomic_write(path) as file:
            np.savez(file, table=self.table, topk=self.topk, vocab_size=self.vocab_size, **extra)

    def load(self, path: str | os.PathLike) -> None:
        table, probs = read_table(path)
        if table.shape != self.table.shape:
            raise CorruptTableError(
                f"table in {path} is {table.shape[0]} x {table.shape[1]}, "
                f"this model needs {self.vocab_size} x {self.topk}"
            )
        self.table[...] = table
        if self.probs is not None:
            # A table saved without probabilities: rank r gets a prior of 1 / (r + 2).
            self.probs[...] = probs if probs is not None else (table >= 0) / np.arange(2, self.topk + 2)
        self.writes += 1


def read_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            table = data["table"]
            probs = data["probs"] if "probs" in data.files else None
    except FileNotFoundError:
        raise CorruptTableError(f"no table file at {path}") from None
    except Exception as exc:  # numpy raises many kinds for a damaged file
        raise CorruptTableError(f"cannot read table file {path}: {exc.__class__.__name__}") from None
    if table.ndim != 2 or table.dtype != np.int32:
        raise CorruptTableError(f"table file {path} does not hold an int32 matrix")
    if table.size and (table.min() < UNWRITTEN or table.max() >= table.shape[0]):
        raise CorruptTableError(f"table file {path} holds token ids outside the vocabulary")
    if probs is not None and (probs.shape != table.shape or probs.dtype != np.float16):
        raise CorruptTableError(f"table file {path} has probabilities that do not match its table")
    return table, probs
