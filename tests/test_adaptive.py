"""The adaptive tree: it deepens on repetitive text, shrinks on unpredictable text, stays exact."""

from __future__ import annotations

import numpy as np

from fakes import decode_alone
from tokenrecycle.drafters import AdaptiveTreeDrafter
from tokenrecycle.trees import rank_budget_template

from fakes import ScriptedRunner, cycle_model, sequential_greedy

V = 32
PROMPT = np.array([3, 1, 4, 1, 5], dtype=np.int64)
# A profile-like prior: the top candidate is accepted a third of the time, others rarely.
PRIOR = {p: (0.35, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01, 0.01)[p[-1]] for p in rank_budget_template(6, 2, 8)}
COST = {n: 10.0 + 0.2 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}


def scrambled_model(ctx):
    """Deterministic but hard to guess from the last token alone."""
    return (ctx[-1] * 7 + ctx[-2] * 13 + len(ctx) * 5) % V if len(ctx) > 1 else 1


def decode(next_token, tokens: int, drafter) -> list[int]:
    runner = ScriptedRunner(next_token, vocab_size=V)
    out = []
    for step in decode_alone(runner, drafter, PROMPT, tokens):
        out += step.tokens
    return out


def test_repetitive_text_grows_a_deeper_tree_and_stays_exact():
    drafter = AdaptiveTreeDrafter(V, PRIOR, COST, topk=8, every=4)
    start_depth = drafter.template.max_depth
    out = decode(cycle_model(period=5), 96, drafter)
    assert out == sequential_greedy(cycle_model(period=5), PROMPT.tolist(), 96)
    assert drafter.template.max_depth > start_depth
    assert drafter.rates()[(0,)] > PRIOR[(0,)]


def test_unpredictable_text_shrinks_the_tree_and_stays_exact():
    drafter = AdaptiveTreeDrafter(V, PRIOR, COST, topk=8, every=4)
    start_nodes = drafter.template.num_nodes
    out = decode(scrambled_model, 96, drafter)
    assert out == sequential_greedy(scrambled_model, PROMPT.tolist(), 96)
    assert drafter.template.num_nodes < start_nodes


def test_each_request_starts_from_the_prior():
    drafter = AdaptiveTreeDrafter(V, PRIOR, COST, topk=8, every=4)
    first = drafter.template.paths
    decode(cycle_model(period=5), 64, drafter)
    assert drafter.template.paths != first
    decode(cycle_model(period=5), 1, drafter)  # a new request: only the prefill ran
    assert drafter.template.paths == first


def test_topk_below_the_profiles_ranks():
    drafter = AdaptiveTreeDrafter(V, PRIOR, COST, topk=2)
    assert int(drafter.template.ranks.max()) < 2
    assert decode(cycle_model(), 40, drafter) == sequential_greedy(cycle_model(), PROMPT.tolist(), 40)
