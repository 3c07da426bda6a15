"""Verification of a draft tree against the target's logits: greedy, or sampling (pure given the draws).

Both keep exactly what plain decoding would give: greedy keeps the longest path of argmax tokens;
sampling walks down the tree drawing each next token from the target's own distribution, so every
token is a sample of the target whatever the drafts were.
"""

from __future__ import annotations

import numpy as np
import torch

from .sampling import Draws, Sampling
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


def verify_sampled(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, draws: Draws) -> tuple[np.ndarray, int]:
    """Sampling verification: by recursive rejection sampling for drafts drawn from a draft model
    (the tree carries their distributions), else by drawing from the target at each node."""
    if tree.draft_probs is not None:
        return verify_drawn_drafts(tree, logits, sampling, draws)
    return verify_fixed_drafts(tree, logits, sampling, draws)


def verify_fixed_drafts(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, draws: Draws) -> tuple[np.ndarray, int]:
    """From the root, draw the next token from the target's distribution at the current node; if a
    child holds that token, accept it and go on from there, else the draw is the bonus token.

    This is the rule for drafts that are not themselves sampled (Token Recycling, lookup): each
    draw is exactly the target's next-token sample, so the output follows the target's
    distribution. It equals trying the children in turn, accepting child x with probability
    p(x) / (mass not yet rejected); the draft-model rule min(1, p/q) would be biased here.
    """
    child_of = {(int(parent), int(token)): node for node, (parent, token) in enumerate(zip(tree.parents, tree.tokens)) if node}
    path = [0]
    while True:
        token = draws.draw(sampling.probabilities(logits[path[-1]]))
        child = child_of.get((path[-1], token))
        if child is None:
            return np.array(path), token
        path.append(child)


def verify_drawn_drafts(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, draws: Draws) -> tuple[np.ndarray, int]:
    """Recursive rejection sampling (RSD, arXiv 2402.14160) over children drawn from q without
    replacement; with one child per node it is speculative sampling's min(1, p/q) rule.

    At a node with target distribution p: child x_i (drawn from q_i) is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); on rejection p_{i+1} = normalised max(0, p_i - q_i) and q_{i+1} =
    q_i without x_i, renormalised. If every child is rejected the bonus token is drawn from the
    last p. Each accepted or drawn token then follows the target's distribution exactly.
    """
    path = [0]
    while True:
        p = sampling.probabilities(logits[path[-1]]).double()
        children = np.flatnonzero(tree.parents == path[-1])
        q = tree.draft_probs[children[0]].double() if len(children) else None
        for child in children:
            token = int(tree.tokens[child])
            if draws.draw(bernoulli(min(1.0, float(p[token] / q[token])))) == 1:
                path.append(int(child))
                break
            p, q = residual(p, q), without(q, token)
        else:  # every child rejected, or a leaf: the bonus token
            return np.array(path), draws.draw(p.float())


def bernoulli(probability: float) -> torch.Tensor:
    """[P(0), P(1)] for a coin that shows 1 with the given probability."""
    return torch.tensor([1.0 - probability, probability], dtype=torch.float64)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalised max(0, p - q): what p still owes after q's proposal was rejected."""
    rest = torch.clamp(p - q, min=0)
    total = rest.sum()
    return rest / total if total > 0 else p


def without(q: torch.Tensor, token: int) -> torch.Tensor:
    """q after drawing `token` without replacement: that token removed, the rest renormalised."""
    q = q.clone()
    q[token] = 0
    total = q.sum()
    return q / total if total > 0 else q


class GreedyVerifier:
    sampling = None  # greedy: no settings and no random draws
    draws = None

    def first_token(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())

    def verify(self, tree: DraftTree, logits: torch.Tensor) -> tuple[np.ndarray, int]:
        return verify_greedy(tree, logits)


class SamplingVerifier:
    def __init__(self, sampling: Sampling, draws: Draws | None = None):
        self.sampling = sampling
        self.draws = draws or Draws(sampling.seed)

    def first_token(self, logits: torch.Tensor) -> int:
        return self.draws.draw(self.sampling.probabilities(logits))

    def verify(self, tree: DraftTree, logits: torch.Tensor) -> tuple[np.ndarray, int]:
        return verify_sampled(tree, logits, self.sampling, self.draws)
