"""The decoding loop of one sequence: propose, verify, observe, commit. Each step decides tokens.

`DecodingLoop` holds one request's loop state on one runner slot and exposes the step in its
parts (`next_tree`, then the forward pass, then `decide`), so an engine can run the forward passes
of several loops its own way; `step` does all three for one loop. A prompt can also go in chunks
(`prompt_chunk`, run like a tree, then `decide`) on runners that batch, so that a long prompt
shares passes with running requests instead of holding them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .drafters import Drafter
from .runners import ModelRunner
from .trees import DraftTree, chain_tree, limit_depth
from .verify import GreedyVerifier, SamplingVerifier

GREEDY = GreedyVerifier()
Verifier = GreedyVerifier | SamplingVerifier


@dataclass
class Step:
    """What one forward pass decided: its tokens, the pass's logits, and the tree and path behind
    them (None for the prefill, whose logits are the one row that predicted its token)."""

    tokens: list[int]
    logits: torch.Tensor
    tree: DraftTree | None = None
    accepted: np.ndarray | None = None

    def predicting_logits(self) -> torch.Tensor:
        """One row per decided token: the logits that predicted it (node i's row predicts the
        token after node i, so the accepted path's rows predict what was decided)."""
        return self.logits if self.accepted is None else self.logits[torch.as_tensor(self.accepted)]


class DecodingLoop:
    """One sequence decoded on one runner slot: exactly plain greedy decoding's tokens, or under a
    sampling verifier a sample of exactly plain sampling's distribution.

    The first step (one token) is the prefill; each later one holds the accepted draft tokens plus
    the bonus token. The total never exceeds max_new_tokens: trees are cut to the depth that could
    still be used. The caller stops early (EOS, stop strings) by simply not stepping again.
    """

    def __init__(
        self,
        runner: ModelRunner,
        slot: int,
        drafter: Drafter,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        verifier: Verifier = GREEDY,
    ):
        self.runner, self.slot, self.drafter, self.verifier = runner, slot, drafter, verifier
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.produced = 0
        self._token: int | None = None  # the last decided token: the next tree's root
        self.fed = 0  # prompt tokens in the cache, while the prompt goes in chunks
        self._chunk_logits: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return self.produced >= self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        """Whether the prompt is still to be run (no token decided yet)."""
        return self._token is None

    def prefill(self) -> Step:
        self.drafter.prepare(self.verifier.sampling, self.verifier.draws)
        return self._first_step(self.runner.prefill(self.slot, self.prompt_ids, reserve=self.max_new_tokens))

    def prompt_chunk(self, size: int) -> DraftTree:
        """The next `size` prompt tokens as a chain to run on top of the slot (the first chunk
        empties the slot); `decide` then keeps it."""
        if self.fed == 0:
            self.drafter.prepare(self.verifier.sampling, self.verifier.draws)
            self.runner.begin(self.slot, len(self.prompt_ids) + self.max_new_tokens)
        return chain_tree(self.prompt_ids[self.fed : self.fed + size])

    def _take_chunk(self, chunk: DraftTree, logits: torch.Tensor) -> Step | None:
        """Keep a prompt chunk; after the last one, the first token (as `prefill` gives it)."""
        self.runner.commit(self.slot, np.arange(len(chunk)))
        self.fed += len(chunk)
        self._chunk_logits.append(logits)
        if self.fed < len(self.prompt_ids):
            return None
        logits, self._chunk_logits = torch.cat(self._chunk_logits), []
        return self._first_step(logits)

    def _first_step(self, prompt_logits: torch.Tensor) -> Step:
        self.drafter.start(self.prompt_ids, prompt_logits)
        self._token = self.verifier.first_token(prompt_logits[-1])
        self.produced = 1
        return Step([self._token], prompt_logits[-1:])

    def next_tree(self) -> DraftTree:
        """The drafter's tree from the last decided token, cut to the depth that can still be used."""
        room = self.runner.max_context - self.runner.cache_length(self.slot)
        depth_room = min(self.max_new_tokens - self.produced, room) - 1
        return limit_depth(self.drafter.propose(self._token), depth_room)

    def decide(self, tree: DraftTree, logits: torch.Tensor) -> Step | None:
        """Verify the tree against its logits, let the drafter learn, keep the accepted path (for
        a prompt chunk: keep it; None until the prompt's last chunk gives the first token)."""
        if self._token is None:
            return self._take_chunk(tree, logits)
        accepted, self._token = self.verifier.verify(tree, logits)
        self.drafter.observe(tree, logits, accepted)
        self.runner.commit(self.slot, accepted)
        step = Step(tree.tokens[accepted[1:]].tolist() + [self._token], logits, tree, accepted)
        self.produced += len(step.tokens)
        return step

    def step(self) -> Step:
        """The next forward pass of this sequence alone: the prefill first, then one tree."""
        if self._token is None:
            return self.prefill()
        tree = self.next_tree()
        return self.decide(tree, self.runner.forward_tree(self.slot, tree))


def speculative_decode(
    runner: ModelRunner,
    slot: int,
    drafter: Drafter,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    verifier: Verifier = GREEDY,
) -> Iterator[Step]:
    """Yield the steps of one sequence on a slot the caller holds (see DecodingLoop)."""
    loop = DecodingLoop(runner, slot, drafter, prompt_ids, max_new_tokens, verifier)
    while not loop.done:
        yield loop.step()
