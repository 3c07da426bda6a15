"""Small stand-ins for a model and a tokenizer, so the loop can be tested by hand."""

import numpy as np
import torch

from tokenrecycle.decoding import GREEDY, speculative_decode
from tokenrecycle.runners import Loop, ModelRunner, RunnerKind
from tokenrecycle.trees import DraftTree


class ScriptedRunner(ModelRunner):
    """A 'model' whose greedy next token is a fixed function of the whole context.

    The logits are one-hot on `next_token(context)`, with a little mass on a second choice so top-k
    rows have distinct entries. Each slot's cache is the list of its committed tokens; commit is checked.
    """

    kind = RunnerKind.FAST
    loop = Loop.PYTHON

    def __init__(self, next_token, vocab_size=16, max_context=512, max_slots=4):
        super().__init__(max_slots)
        self.next_token = next_token
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.contexts: dict[int, list[int]] = {}
        self.pending: dict[int, list[list[int]]] = {}
        self.forward_sizes: list[int] = []

    def cache_length(self, slot: int) -> int:
        return len(self.contexts.get(slot, []))

    @property
    def cache_bytes(self) -> int:
        return 0

    def _logits_for(self, context):
        logits = torch.zeros(self.vocab_size)
        best = self.next_token(context)
        logits[(best + 1) % self.vocab_size] = 0.5
        logits[best] = 1.0
        return logits

    def prefill(self, slot, input_ids, reserve=0):
        self._check_slot(slot)
        context = self.contexts[slot] = [int(t) for t in input_ids]
        return torch.stack([self._logits_for(context[: i + 1]) for i in range(len(context))])

    def forward_tree(self, slot, tree: DraftTree):
        self._check_slot(slot)
        self.forward_sizes.append(len(tree))
        context = self.contexts[slot]
        self.pending[slot] = [context + tree.tokens[tree.path_to(i)].tolist() for i in range(len(tree))]
        return torch.stack([self._logits_for(ctx) for ctx in self.pending[slot]])

    def commit(self, slot, accepted):
        self._check_slot(slot)
        pending, self.pending[slot] = self.pending.get(slot, []), []
        if len(accepted) == 0:  # keep nothing of the pending tree
            return
        path_context, context = pending[int(accepted[-1])], self.contexts[slot]
        assert path_context[: len(context)] == context
        assert len(path_context) == len(context) + len(accepted)
        self.contexts[slot] = path_context


class OneSequence:
    """A runner seen as one sequence on a slot of its own: tests drive runners step by step."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.slot = runner.allocate()

    def prefill(self, input_ids, reserve=0):
        return self.runner.prefill(self.slot, input_ids, reserve)

    def forward_tree(self, tree):
        return self.runner.forward_tree(self.slot, tree)

    def commit(self, accepted):
        self.runner.commit(self.slot, accepted)

    @property
    def cache_length(self) -> int:
        return self.runner.cache_length(self.slot)

    def release(self) -> None:
        self.runner.release(self.slot)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def decode_alone(runner, drafter, prompt, max_new_tokens, verifier=GREEDY):
    """speculative_decode on a slot of its own, given back when the steps end."""
    with runner.borrowed_slot() as slot:
        yield from speculative_decode(runner, slot, drafter, prompt, max_new_tokens, verifier)


def sequential_greedy(next_token, prompt, count, eos=None):
    """Plain greedy decoding of the scripted model, one token at a time."""
    context, out = list(prompt), []
    for _ in range(count):
        token = next_token(context)
        out.append(token)
        context.append(token)
        if token == eos:
            break
    return out


class CharTokenizer:
    """Token id i decodes to PIECES[i]; id 0 is a special token that decodes to nothing."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


def cycle_model(period=5, vocab_size=16):
    """next token = (last + 1) mod period + 1: a repetitive text the table learns quickly."""
    return lambda ctx: (ctx[-1] % period) + 1 if ctx else 1


def as_array(ids):
    return np.asarray(ids, dtype=np.int64)


# ---- the engine ----------------------------------------------------------------------------------
def run_all(engine, requests):
    """Step until every request has ended; the slots are all free again afterwards."""
    for _ in range(10_000):
        if all(r.finished for r in requests):
            break
        engine.step()
    assert engine.idle and engine.runner.free_slots == engine.runner.max_slots
    return [r.result for r in requests]


def alone(engine, prompt, settings):
    request = engine.submit(prompt, settings)
    return run_all(engine, [request])[0]
