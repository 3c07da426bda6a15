"""Drafts from a draft model that shares the target's tokenizer: a chain (speculative sampling,
with a length that follows acceptance) or a tree drawn without replacement (Recursive Speculative
Decoding with a fixed branching per level).

Under greedy decoding the drafts are the draft model's most likely tokens; under sampling they
are drawn from its distribution (with the same sampling settings), and the tree carries those
distributions so the verifier can apply (recursive) rejection sampling.

The draft model runs on its own runner and KV cache. Its cache holds the decided tokens before
the root; the tokens decided since the last step (the accepted path) are fed in front of the root
in the first forward pass of the next step, and kept, so no step ever needs a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidOptionError
from ..runners import ModelRunner
from ..sampling import Draws, Sampling
from ..trees import DraftTree, chain_tree, tree_from_parents
from .base import Drafter


class DraftModelDrafter(Drafter):
    def __init__(
        self,
        runner: ModelRunner,
        branching: Sequence[int] = (1, 1, 1, 1),
        adaptive: bool = False,
        max_length: int = 8,
        beam: int | None = None,
    ):
        """branching[d]: children drawn per node at depth d (all 1: a chain). adaptive (chains
        only): the length grows by one after a fully accepted chain and shrinks after a miss.
        beam: instead of a fixed branching, a stochastic beam search of this width over
        len(branching) levels (RSD's SBS variant: unlikely sequences are dropped early)."""
        if not branching or any(int(b) < 1 for b in branching):
            raise InvalidOptionError(f"branching needs at least one level of at least one child, got {list(branching)}")
        if adaptive and (any(b != 1 for b in branching) or beam):
            raise InvalidOptionError("an adaptive length is for chains (branching of ones)")
        if beam is not None and beam < 1:
            raise InvalidOptionError(f"the beam width must be at least 1, got {beam}")
        self.beam = beam
        self.runner = runner
        self.branching = [int(b) for b in branching]
        self.adaptive = adaptive
        self.max_length = max_length
        self.sampling = None
        self.draws = None
        self._fed_before_root: list[int] = []
        self._slot: int | None = None  # this drafter's sequence on the draft runner

    def prepare(self, sampling: Sampling | None, draws: Draws | None) -> None:
        self.sampling, self.draws = sampling, draws

    def start(self, prompt_ids: np.ndarray, prompt_logits: torch.Tensor) -> None:
        if self._slot is None:  # kept from one request to the next until finish()
            self._slot = self.runner.allocate()
        self.runner.prefill(self._slot, prompt_ids)
        self._fed_before_root = []

    def finish(self) -> None:
        if self._slot is not None:
            self.runner.release(self._slot)
            self._slot = None

    def propose(self, root_token: int) -> DraftTree:
        if self.beam:
            return self._propose_beam(root_token)
        tokens, parents, dists = [root_token], [-1], [None]
        frontier = [0]
        for level, width in enumerate(self.branching):
            logits = self._draft_logits(tokens, parents, first=level == 0)
            grown = []
            for node in frontier:
                q = self._distribution(logits[node])
                for token in self._children(logits[node], q, width):
                    tokens.append(token)
                    parents.append(node)
                    dists.append(q)
                    grown.append(len(tokens) - 1)
            frontier = grown
        return self._tree(tokens, parents, dists)

    def _propose_beam(self, root_token: int) -> DraftTree:
        """Stochastic beam search (Kool et al. 2019): each sequence's log-probability plus Gumbel
        noise, conditioned so a child never beats its parent; the `beam` best sequences of each
        level are kept. A node's kept children are then the first ones of its own Gumbel-top-k
        order, drawn without replacement from q, so recursive rejection sampling verifies them.
        Greedy decoding keeps the `beam` most likely sequences instead (plain beam search)."""
        tokens, parents, dists = [root_token], [-1], [None]
        beam = [(0, 0.0, 0.0)]  # (node, log-probability, perturbed log-probability)
        for level in range(len(self.branching)):
            logits = self._draft_logits(tokens, parents, first=level == 0)
            candidates = []
            for node, log_p, perturbed in beam:
                q = self._distribution(logits[node])
                log_q = torch.log_softmax(logits[node].float(), dim=-1) if q is None else torch.log(q)
                candidates += self._beam_children(node, log_p, perturbed, log_q, q)
            candidates.sort(key=lambda c: -c[0])
            kept = sorted(candidates[: self.beam], key=lambda c: (c[1], -c[0]))  # by parent, best first
            beam = []
            for score, node, token, log_p, q in kept:
                tokens.append(token)
                parents.append(node)
                dists.append(q)
                beam.append((len(tokens) - 1, log_p, score))
        return self._tree(tokens, parents, dists)

    def _beam_children(self, node: int, log_p: float, perturbed: float, log_q: torch.Tensor, q: torch.Tensor | None):
        """The node's best `beam` children as (score, node, token, log-probability, q)."""
        support = torch.nonzero(torch.isfinite(log_q)).flatten()
        child_log_p = log_p + log_q[support].double()
        if q is None:
            scores = child_log_p
        else:
            raw = child_log_p + self.draws.gumbel(len(support)).to(child_log_p.device)
            scores = conditioned_gumbel(raw, perturbed)
        best = torch.topk(scores, min(self.beam, len(support)))
        return [
            (float(scores[i]), node, int(support[i]), float(child_log_p[i]), q)
            for i in best.indices.tolist()
        ]

    def _tree(self, tokens: list[int], parents: list[int], dists: list) -> DraftTree:
        """The drafted tree; when sampling, with the distribution each node was drawn from (the
        root's row is a placeholder: nothing was drawn for it)."""
        probs = None if self.sampling is None else torch.stack([dists[1] if d is None else d for d in dists])
        return tree_from_parents(tokens, parents, probs)

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted: np.ndarray) -> None:
        self._fed_before_root = tree.tokens[accepted].tolist()
        if self.adaptive:
            drafted = len(self.branching)
            if len(accepted) - 1 == drafted:
                self.branching = [1] * min(drafted + 1, self.max_length)
            elif len(accepted) - 1 < drafted - 1 and drafted > 1:
                self.branching = [1] * (drafted - 1)

    # ---- the draft model -----------------------------------------------------------------
    def _draft_logits(self, tokens: list[int], parents: list[int], first: bool) -> torch.Tensor:
        """Draft logits for every node of the tree so far. The first pass of a step also runs the
        tokens decided since the last step in front of the root, and keeps them in the cache."""
        if first:
            prefix = self._fed_before_root + tokens[:1]
            logits = self.runner.forward_tree(self._slot, chain_tree(prefix))
            self.runner.commit(self._slot, np.arange(len(prefix) - 1))  # all but the root, which is re-run below
            return logits[-1:]
        logits = self.runner.forward_tree(self._slot, tree_from_parents(tokens, parents))
        self.runner.commit(self._slot, np.arange(0))  # drafts never stay in the cache
        return logits

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The draft distribution under the request's sampling settings (None when greedy)."""
        return None if self.sampling is None else self.sampling.probabilities(logits)

    def _children(self, logits: torch.Tensor, q: torch.Tensor | None, width: int) -> list[int]:
        """Greedy: the `width` most likely tokens. Sampling: `width` tokens drawn from q without
        replacement, in the order drawn (the order the verifier tries them)."""
        if q is None:
            return torch.topk(logits, width).indices.tolist()
        chosen, rest = [], q.clone().double()
        for _ in range(min(width, int((q > 0).sum()))):
            token = self.draws.draw(rest / rest.sum())
            chosen.append(token)
            rest[token] = 0
        return chosen


def conditioned_gumbel(raw: torch.Tensor, parent: float) -> torch.Tensor:
    """Perturbed scores of siblings, shifted so their maximum is the parent's (Kool et al., eq. 23,
    in the numerically stable form): order within the siblings is kept."""
    top = raw.max()
    v = parent - raw + torch.log1p(-torch.exp(raw - top))  # -inf for the top one: it gets the parent's value
    return parent - torch.clamp(v, min=0) - torch.log1p(torch.exp(-v.abs()))


@dataclass(frozen=True)
class DraftShape:
    """How a draft model's drafts are shaped: children per level (a chain is all ones), whether a
    chain's length follows acceptance, or a stochastic beam of width `beam`."""

    branching: tuple[int, ...] = (1,)
    adaptive: bool = True
    beam: int | None = None

    @classmethod
    def parse(cls, text: str) -> DraftShape:
        """`chain` (adaptive length), widths like `2,2,1` (an RSD tree) or `beam:W,D`."""
        if text == "chain":
            return cls()
        kind, _, sizes = text.rpartition(":")
        try:
            numbers = tuple(int(size) for size in sizes.split(","))
        except ValueError:
            numbers = ()
        if kind == "beam" and len(numbers) == 2 and min(numbers) >= 1:
            return cls((1,) * numbers[1], adaptive=False, beam=numbers[0])
        if kind == "" and numbers and min(numbers) >= 1:
            return cls(numbers, adaptive=False)
        raise InvalidOptionError(f"the draft shape must be chain, widths like 2,2,1 or beam:W,D, got '{text}'")
