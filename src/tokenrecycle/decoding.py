"""The decoding loop: propose, verify, observe, commit. One step yields the tokens it decided."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .drafters import Drafter
from .runners import ModelRunner
from .trees import DraftTree, limit_depth
from .verify import GreedyVerifier, SamplingVerifier

GREEDY = GreedyVerifier()


@dataclass
class Step:
    """What one forward pass decided: its tokens, and the tree and path behind them (None for the prefill)."""

    tokens: list[int]
    tree: DraftTree | None = None
    accepted: np.ndarray | None = None


def speculative_decode(
    runner: ModelRunner,
    drafter: Drafter,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    verifier: GreedyVerifier | SamplingVerifier = GREEDY,
) -> Iterator[Step]:
    """Yield the tokens decided at each forward pass: exactly plain greedy decoding's, or under a
    sampling verifier a sample of exactly plain sampling's distribution.

    The first yield (one token) comes from the prefill; each later one holds the accepted draft
    tokens plus the bonus token. The total never exceeds max_new_tokens: trees are cut to the
    depth that could still be used. The caller stops early (EOS, stop strings) by closing it.
    """
    drafter.prepare(verifier)
    logits = runner.prefill(prompt_ids, reserve=max_new_tokens)
    drafter.start(prompt_ids, logits)
    token = verifier.first_token(logits[-1])
    yield Step([token])
    produced = 1
    while produced < max_new_tokens:
        depth_room = min(max_new_tokens - produced, runner.max_context - runner.cache_length) - 1
        tree = limit_depth(drafter.propose(token), depth_room)
        logits = runner.forward_tree(tree)
        accepted, token = verifier.verify(tree, logits)
        drafter.observe(tree, logits, accepted)
        runner.commit(accepted)
        step = Step(tree.tokens[accepted[1:]].tolist() + [token], tree, accepted)
        produced += len(step.tokens)
        yield step
