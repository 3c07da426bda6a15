"""Small stand-ins for a model and a tokenizer, so the loop can be tested by hand."""

import numpy as np
import torch

from tokenrecycle.runners import ModelRunner
from tokenrecycle.trees import DraftTree


class ScriptedRunner(ModelRunner):
    """A 'model' whose greedy next token is a fixed function of the whole context.

    The logits are one-hot on `next_token(context)`, with a little mass on a second choice so top-k
    rows have distinct entries. The cache is the list of committed tokens; commit is checked.
    """

    def __init__(self, next_token, vocab_size=16, max_context=512):
        self.next_token = next_token
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.context: list[int] = []
        self.pending: list[list[int]] = []
        self.forward_sizes: list[int] = []

    @property
    def cache_length(self) -> int:
        return len(self.context)

    def _logits_for(self, context):
        logits = torch.zeros(self.vocab_size)
        best = self.next_token(context)
        logits[(best + 1) % self.vocab_size] = 0.5
        logits[best] = 1.0
        return logits

    def prefill(self, input_ids, reserve=0):
        self.context = [int(t) for t in input_ids]
        return torch.stack([self._logits_for(self.context[: i + 1]) for i in range(len(self.context))])

    def forward_tree(self, tree: DraftTree):
        self.forward_sizes.append(len(tree))
        self.pending = [self.context + tree.tokens[tree.path_to(i)].tolist() for i in range(len(tree))]
        return torch.stack([self._logits_for(ctx) for ctx in self.pending])

    def commit(self, accepted):
        if len(accepted) == 0:  # keep nothing of the pending tree
            self.pending = []
            return
        path_context = self.pending[int(accepted[-1])]
        assert path_context[: len(self.context)] == self.context
        assert len(path_context) == len(self.context) + len(accepted)
        self.context = path_context
        self.pending = []


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
