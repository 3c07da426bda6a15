"""Draft trees as data.

A *template* is a list of rank paths: (0, 1) means "the rank-1 candidate after the rank-0 candidate
after the root". `compile_template` turns one into the buffers every step needs, once. A drafter
fills a compiled template with tokens and prunes the nodes it cannot fill, giving a `DraftTree`:
the only thing the verifier and the runner ever see. Node 0 of every tree is the root, the last
token already decided; its logits predict depth 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import InvalidTemplateError

RankPath = tuple[int, ...]


@dataclass(frozen=True)
class CompiledTree:
    """A template's structure in breadth-first order; node 0 is the root (the empty path)."""

    paths: tuple[RankPath, ...]
    parents: np.ndarray  # (n,) int64; parents[0] == -1
    ranks: np.ndarray  # (n,) rank of each node among its parent's candidates; 0 for the root
    depths: np.ndarray  # (n,) int64; 0 for the root
    ancestor_mask: np.ndarray  # (n, n) bool; [i, j] is True when j is i or an ancestor of i
    level_bounds: tuple[tuple[int, int], ...]  # node index range [start, end) of each depth >= 1

    @property
    def num_nodes(self) -> int:
        """Draft nodes, root excluded: the extra tokens one verification pass costs."""
        return len(self.paths) - 1

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def leaf_paths(self) -> np.ndarray:
        """(leaves, max_depth + 1) node indices of every root-to-leaf path, right-padded with -1."""
        is_parent = np.zeros(len(self.paths), dtype=bool)
        is_parent[self.parents[1:]] = True
        leaves = np.flatnonzero(~is_parent)
        out = np.full((len(leaves), self.max_depth + 1), -1, dtype=np.int64)
        for row, leaf in enumerate(leaves):
            chain = np.flatnonzero(self.ancestor_mask[leaf])
            out[row, : len(chain)] = chain
        return out


@dataclass(frozen=True)
class DraftTree:
    """Tokens to verify in one pass: node 0 is the root, parents precede children."""

    tokens: np.ndarray  # (n,) int64
    parents: np.ndarray  # (n,) int64; parents[0] == -1
    depths: np.ndarray  # (n,) int64
    ancestor_mask: np.ndarray  # (n, n) bool
    source: np.ndarray  # (n,) int64: each node's index in the template it was grown from
    # For drafts sampled from a draft model: row i is the distribution node i was drawn from (its
    # siblings were drawn from the same one, without replacement, in node order); row 0 unused.
    draft_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def path_to(self, node: int) -> np.ndarray:
        """Node indices from the root to `node`, both included."""
        return np.flatnonzero(self.ancestor_mask[node])


def validate_template(paths: Iterable[Sequence[int]], topk: int) -> list[RankPath]:
    """Return the paths as tuples, or raise InvalidTemplateError saying what is wrong."""
    result: list[RankPath] = []
    for path in paths:
        if not isinstance(path, (list, tuple)) or not all(_is_int(r) for r in path):
            raise InvalidTemplateError(f"template entry {path!r} is not a list of integer ranks")
        result.append(tuple(int(r) for r in path))
    seen = set(result)
    if len(seen) != len(result):
        raise InvalidTemplateError("template has duplicate paths")
    for path in result:
        if not path:
            raise InvalidTemplateError("template paths must not be empty (the root is implicit)")
        if any(r < 0 or r >= topk for r in path):
            raise InvalidTemplateError(f"template path {list(path)} has a rank outside 0..{topk - 1} (topk={topk})")
        if len(path) > 1 and path[:-1] not in seen:
            raise InvalidTemplateError(f"template path {list(path)} has no parent path {list(path[:-1])}")
    return result


def trim_to_topk(paths: Iterable[Sequence[int]], topk: int) -> list[RankPath]:
    """The paths whose every rank is below topk (a prefix-closed set stays prefix-closed)."""
    return [tuple(path) for path in paths if max(path) < topk]


def compile_template(paths: Iterable[Sequence[int]], topk: int) -> CompiledTree:
    """Validate a template and build its buffers (pure)."""
    ordered = [()] + sorted(validate_template(paths, topk), key=lambda p: (len(p), p))
    index = {path: i for i, path in enumerate(ordered)}
    parents = np.array([-1] + [index[p[:-1]] for p in ordered[1:]], dtype=np.int64)
    ranks = np.array([0] + [p[-1] for p in ordered[1:]], dtype=np.int64)
    depths = np.array([len(p) for p in ordered], dtype=np.int64)
    return CompiledTree(
        paths=tuple(ordered),
        parents=parents,
        ranks=ranks,
        depths=depths,
        ancestor_mask=ancestor_mask_from_parents(parents),
        level_bounds=_level_bounds(depths),
    )


def chain_tree(tokens: Sequence[int]) -> DraftTree:
    """A tree with no branches: each token the child of the one before (a prompt, a plain step)."""
    n = len(tokens)
    return DraftTree(
        tokens=np.asarray(tokens, dtype=np.int64),
        parents=np.arange(-1, n - 1, dtype=np.int64),
        depths=np.arange(n, dtype=np.int64),
        ancestor_mask=np.tril(np.ones((n, n), dtype=bool)),
        source=np.arange(n, dtype=np.int64),
    )


def tree_from_parents(tokens: Sequence[int], parents: Sequence[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
    """A tree from each node's token and parent (parents before children, node 0 the root)."""
    parents = np.asarray(parents, dtype=np.int64)
    depths = np.zeros(len(parents), dtype=np.int64)
    for node in range(1, len(parents)):
        depths[node] = depths[parents[node]] + 1
    return DraftTree(
        tokens=np.asarray(tokens, dtype=np.int64),
        parents=parents,
        depths=depths,
        ancestor_mask=ancestor_mask_from_parents(parents),
        source=np.arange(len(parents), dtype=np.int64),
        draft_probs=draft_probs,
    )


def tree_visibility(tree: DraftTree, start: int, window: int | None, first_key: int = 0) -> np.ndarray:
    """(n, start - first_key + n) bool: which keys each node may attend to (pure).

    Keys are the committed positions first_key..start-1 followed by the tree's own nodes. A node at
    position p = start + depth sees key position q when q is committed or an ancestor, and, for a
    sliding-window layer, p - q < window.
    """
    n = len(tree)
    visible = np.ones((n, start - first_key + n), dtype=bool)
    visible[:, start - first_key :] = tree.ancestor_mask
    if window is not None:
        node_pos = start + tree.depths
        key_pos = np.concatenate([np.arange(first_key, start), node_pos])
        visible &= (node_pos[:, None] - key_pos[None, :]) < window
    return visible


def ancestor_mask_from_parents(parents: np.ndarray) -> np.ndarray:
    """[i, j] is True when j is i or an ancestor of i; parents must precede children."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def prune(tree: CompiledTree | DraftTree, tokens: np.ndarray, keep: np.ndarray) -> DraftTree:
    """Keep the nodes marked in `keep` whose ancestors are all kept too (pure).

    A node whose parent was dropped is dropped with it, so the result is always a valid tree.
    """
    keep = keep.copy()
    keep[0] = True
    for i in range(1, len(keep)):
        keep[i] &= keep[tree.parents[i]]
    kept = np.flatnonzero(keep)
    new_index = np.full(len(keep), -1, dtype=np.int64)
    new_index[kept] = np.arange(len(kept))
    parents = new_index[tree.parents[kept]]
    parents[0] = -1
    return DraftTree(
        tokens=np.asarray(tokens, dtype=np.int64)[kept],
        parents=parents,
        depths=tree.depths[kept],
        ancestor_mask=tree.ancestor_mask[np.ix_(kept, kept)],
        source=_source_of(tree)[kept],
        draft_probs=None if getattr(tree, "draft_probs", None) is None else tree.draft_probs[torch.as_tensor(kept)],
    )


def _source_of(tree: CompiledTree | DraftTree) -> np.ndarray:
    return tree.source if isinstance(tree, DraftTree) else np.arange(len(tree.paths))


def first_of_each_sibling_token(parents: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mask of nodes that are not a repeat of an earlier sibling's token (a repeat wastes a node)."""
    keys = parents * (int(tokens.max(initial=0)) + 1) + tokens
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(tokens), dtype=bool)
    keep[first] = True
    return keep


def offered_nodes(tree: DraftTree, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nodes whose parent was accepted (each had its chance), and which of them were accepted
    themselves: what per-path acceptance rates count."""
    on_path = np.zeros(len(tree), dtype=bool)
    on_path[accepted] = True
    offered = np.flatnonzero(on_path[tree.parents[1:]]) + 1
    return offered, on_path[offered]


def limit_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """Drop every node deeper than max_depth (used near max_new_tokens and the context limit)."""
    if tree.max_depth <= max_depth:
        return tree
    return prune(tree, tree.tokens, tree.depths <= max_depth)


def _level_bounds(depths: np.ndarray) -> tuple[tuple[int, int], ...]:
    return tuple(
        (int(np.searchsorted(depths, d, "left")), int(np.searchsorted(depths, d, "right")))
        for d in range(1, int(depths.max()) + 1)
    )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
