"""The tree chooser on synthetic costs and acceptance rates where the best tree is known by hand."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrecycle.trees.design import choose_tree, expected_tokens, plans_by_size, step_cost
from tokenrecycle.trees import compile_template, rank_budget_template

TOPK = 8


def rates_by_rank(rank_rates, depth: int = 6) -> dict:
    """Rate of a node = the rate of its rank, at every depth (a Token-Recycling-like profile)."""
    paths = [p for p in rank_budget_template(depth, 7, TOPK)]
    return {p: rank_rates[p[-1]] for p in paths}


RANK_RATES = [0.6, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01]


def test_a_hand_computed_case():
    rates = {(0,): 0.5, (1,): 0.2, (0, 0): 0.5}
    cost = {1: 10.0, 2: 11.0, 3: 12.0, 4: 20.0}
    # sizes 0..3: 1/10, 1.5/11, 1.75/12, 1.95/20 tokens per ms: the two-node chain wins
    plan = choose_tree(rates, cost)
    assert plan.paths == ((0,), (0, 0))
    assert plan.expected_tokens == pytest.approx(1.75)
    assert plan.step_ms == 12.0


def test_proportional_cost_means_plain_decoding():
    cost = {n: 10.0 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert choose_tree(rates_by_rank(RANK_RATES), cost).paths == ()


def test_linear_cost_gives_a_chain_or_a_small_tree():
    cost = {n: 20.0 + 4.0 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    plan = choose_tree(rates_by_rank(RANK_RATES), cost)
    assert 1 <= plan.num_nodes <= 8
    assert all(path[1:] == (0,) * (len(path) - 1) for path in plan.paths if len(path) > 1)  # deep only along rank 0


def test_flat_cost_gives_a_wide_tree():
    cost = {n: 20.0 for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    plan = choose_tree(rates_by_rank(RANK_RATES), cost, max_nodes=64)
    assert plan.num_nodes == 64
    assert sum(len(p) == 1 for p in plan.paths) == TOPK  # every first-level candidate
    assert plan.depth >= 4


def test_costlier_trees_never_grow_the_choice():
    rates = rates_by_rank(RANK_RATES)
    cheap = {n: 20.0 + 0.2 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    dear = {n: 20.0 + 2.0 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert choose_tree(rates, dear).num_nodes <= choose_tree(rates, cheap).num_nodes


def test_interpolated_cost():
    cost = {1: 10.0, 4: 16.0, 8: 20.0}
    assert step_cost(cost, 2) == pytest.approx(12.0)
    assert step_cost(cost, 8) == 20.0
    assert step_cost(cost, 12) == pytest.approx(24.0)  # beyond: the last slope


@settings(max_examples=60, deadline=None)
@given(
    rank_rates=st.lists(st.floats(0.0, 1.0), min_size=TOPK, max_size=TOPK),
    base=st.floats(1.0, 50.0),
    slope=st.floats(0.0, 10.0),
)
def test_chosen_trees_are_valid_and_best_of_their_size(rank_rates, base, slope):
    rates = rates_by_rank(rank_rates, depth=4)
    cost = {n: base + slope * n for n in (1, 2, 4, 8, 16, 32, 64, 128)}
    plans = plans_by_size(rates, cost, 40)
    for size, plan in enumerate(plans):
        assert plan.num_nodes == size
        compile_template(list(plan.paths), TOPK)  # prefix-closed, ranks below k
        assert plan.expected_tokens == pytest.approx(expected_tokens(plan.paths, rates))
    gains = [plan.expected_tokens for plan in plans]
    assert gains == sorted(gains)
    chosen = choose_tree(rates, cost, 40)
    assert chosen.tokens_per_s == pytest.approx(max(plan.tokens_per_s for plan in plans))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=14, max_size=14))
def test_best_first_growth_is_optimal_for_each_size(values):
    """Against every prefix-closed subset of a 14-path universe (ranks 0-1, depth 3)."""
    universe = [p for d in (1, 2, 3) for p in itertools.product((0, 1), repeat=d)]
    rates = dict(zip(universe, values))
    best = {}
    for mask in range(1 << len(universe)):
        chosen = {p for i, p in enumerate(universe) if mask >> i & 1}
        if all(p[:-1] in chosen for p in chosen if len(p) > 1):
            size = len(chosen)
            best[size] = max(best.get(size, 0.0), expected_tokens(list(chosen), rates))
    plans = plans_by_size(rates, {1: 1.0, 128: 1.0}, len(universe))
    for plan in plans:
        assert plan.expected_tokens == pytest.approx(best[plan.num_nodes])
