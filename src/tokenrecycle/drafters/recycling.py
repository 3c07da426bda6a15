"""Token Recycling: draft from the model's own top-k candidates seen at earlier steps.

A V x k table holds, for each token t, the k tokens the model ranked highest the last time it
processed t. Drafting grows a template level by level with one gather per depth; every verified
node, rejected ones included, rewrites its token's row.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptTableError, InvalidOptionError
from ..trees import CompiledTree, DraftTree, first_of_each_sibling_token, prune
from .base import Drafter

UNWRITTEN = -1  # a row never written drafts nothing


class TokenRecyclingDrafter(Drafter):
    def __init__(self, vocab_size: int, template: CompiledTree, topk: int = 8, hot_start: bool = True):
        if topk < 1:
            raise InvalidOptionError(f"topk must be at least 1, got {topk}")
        if template.num_nodes and int(template.ranks.max()) >= topk:
            raise InvalidOptionError(f"the tree uses rank {int(template.ranks.max())}, beyond topk={topk}")
        self.vocab_size = vocab_size
        self.topk = topk
        self.template = template
        self.hot_start = hot_start
        self.table = np.full((vocab_size, topk), UNWRITTEN, dtype=np.int32)

    @property
    def memory_bytes(self) -> int:
        return int(self.table.nbytes)

    def reset(self) -> None:
        self.table.fill(UNWRITTEN)

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
        return prune(template, tokens, keep)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        top = self._topk(logits)
        self.table[tree.tokens] = top
        # A token can sit at several nodes; the row from its accepted context should win.
        self.table[tree.tokens[accepted]] = top[accepted]

    def _write(self, tokens: np.ndarray, logits: torch.Tensor) -> None:
        self.table[tokens] = self._topk(logits)

    def _topk(self, logits: torch.Tensor) -> np.ndarray:
        return torch.topk(logits, self.topk, dim=-1).indices.to(torch.int32).cpu().numpy()

    def save(self, path: str | os.PathLike) -> None:
        """Write the table atomically: a crash leaves the old file or none, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, table=self.table, topk=self.topk, vocab_size=self.vocab_size)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, path: str | os.PathLike) -> None:
        table = read_table(path)
        if table.shape != self.table.shape:
            raise CorruptTableError(
                f"table in {path} is {table.shape[0]} x {table.shape[1]}, "
                f"this model needs {self.vocab_size} x {self.topk}"
            )
        self.table[...] = table


def read_table(path: str | os.PathLike) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            table = data["table"]
    except FileNotFoundError:
        raise CorruptTableError(f"no table file at {path}") from None
    except Exception as exc:  # numpy raises many kinds for a damaged file
        raise CorruptTableError(f"cannot read table file {path}: {exc.__class__.__name__}") from None
    if table.ndim != 2 or table.dtype != np.int32:
        raise CorruptTableError(f"table file {path} does not hold an int32 matrix")
    if table.size and (table.min() < UNWRITTEN or table.max() >= table.shape[0]):
        raise CorruptTableError(f"table file {path} holds token ids outside the vocabulary")
    return table
