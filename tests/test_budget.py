"""The batch's tree budget (budget.py), pure: which nodes each request verifies in a shared pass,
the acceptance rates behind the nodes' chances, the pass-cost curve, and cutting a tree."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrecycle.budget import COST_SMOOTHING, DEFAULT_SLOPE, PRIOR_RATE, AcceptanceRates, PassCost, allocate, trim
from tokenrecycle.trees import tree_from_parents


def flat(tokens):
    return np.ones_like(np.asarray(tokens, dtype=float))


def slope(per_token: float):
    return lambda tokens: 1.0 + per_token * np.asarray(tokens, dtype=float)


def random_tree(rng: np.random.Generator, size: int):
    parents = [-1] + [int(rng.integers(0, node)) for node in range(1, size)]
    return tree_from_parents(rng.integers(0, 1000, size=size), parents)


def path_chances(parents, rates) -> np.ndarray:
    """Chances as the rates make them: products along each path (a child never above its parent)."""
    chances = np.ones(len(parents))
    for node in range(1, len(parents)):
        chances[node] = chances[parents[node]] * rates[node]
    return chances


def assert_closed(parents, mask):
    assert mask[0], "the root is always kept"
    for node in np.flatnonzero(mask[1:]) + 1:
        assert mask[parents[node]], f"node {node} chosen without its parent {parents[node]}"


# ---- allocate ---------------------------------------------------------------------------------
trees_and_rates = st.lists(
    st.lists(st.sampled_from([0.0, 1e-3, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(0, 1), min_size=0, max_size=12),
    min_size=1,
    max_size=5,
)


@st.composite
def batches(draw):
    """Trees (random parents, chances as products of rates), prompt-chunk tokens, a bound and a cost curve."""
    rates = draw(trees_and_rates)
    trees = []
    for tree_rates in rates:
        parents = [-1] + [draw(st.integers(0, node - 1)) for node in range(1, len(tree_rates) + 1)]
        trees.append((np.array(parents), path_chances(parents, [1.0] + tree_rates)))
    fixed = draw(st.integers(0, 40))
    max_tokens = draw(st.integers(1, 80))
    # any positive cost by token count (not even monotone): the rule maximises the ratio whatever it is
    steps = draw(st.lists(st.floats(0.0, 2.0), min_size=max_tokens + 130, max_size=max_tokens + 130))
    table = 0.5 + np.cumsum(steps) if draw(st.booleans()) else 0.5 + np.array(steps)
    return trees, fixed, max_tokens, lambda tokens: table[np.asarray(tokens, dtype=int)]


@settings(max_examples=150, deadline=None)
@given(batches())
def test_allocate_maximises_expected_tokens_per_cost_over_the_sorted_prefixes(batch):
    trees, fixed, max_tokens, cost = batch
    chances = [c for _, c in trees]
    masks = allocate(chances, fixed, cost, max_tokens)
    roots = len(trees)
    assert [len(m) for m in masks] == [len(c) for c in chances]
    for (parents, _), mask in zip(trees, masks):
        assert_closed(parents, mask)
    chosen = sum(int(m[1:].sum()) for m in masks)
    room = max(0, max_tokens - fixed - roots)
    assert chosen <= room  # within the bound (roots and chunks are the engine's to fit)
    if fixed + roots <= max_tokens:
        assert fixed + roots + chosen <= max_tokens
    # the chosen nodes are the K best by chance ...
    taken = np.concatenate([c[1:][m[1:]] for c, m in zip(chances, masks)])
    left = np.concatenate([c[1:][~m[1:]] for c, m in zip(chances, masks)])
    if len(taken) and len(left):
        assert taken.min() >= left.max()
    # ... and K is the best prefix of that order: brute force over every K the bound allows
    gains = np.sort(np.concatenate([c[1:] for c in chances]))[::-1]

    def ratio(k: int) -> float:
        return (roots + gains[:k].sum()) / float(cost(fixed + roots + k))

    best = max(ratio(k) for k in range(min(room, len(gains)) + 1))
    assert ratio(chosen) >= best * (1 - 1e-12)


def test_roots_are_kept_even_without_room():
    chances = [np.array([1.0, 0.9, 0.8]), np.array([1.0]), np.array([1.0, 0.99])]
    for fixed in (0, 50, 10_000):
        masks = allocate(chances, fixed, slope(0.01), max_tokens=3)
        assert all(m[0] for m in masks) and sum(int(m[1:].sum()) for m in masks) == 0


def test_large_prompt_chunks_leave_only_the_room_that_is_left():
    chances = [np.array([1.0] + [0.9] * 10), np.array([1.0] + [0.95] * 10)]
    masks = allocate(chances, 60, flat, max_tokens=66)
    assert sum(int(m.sum()) for m in masks) + 60 == 66  # 2 roots + 4 nodes


def test_a_request_whose_drafts_fail_gets_its_root_and_one_that_hits_gets_nodes():
    parents = [-1, 0, 0, 1, 1, 2, 3]
    hopeless = path_chances(parents, [1.0] + [1e-4] * 6)
    promising = path_chances(parents, [1.0] + [0.9] * 6)
    masks = allocate([hopeless, promising], 0, PassCost(), max_tokens=64)
    assert masks[0].tolist() == [True] + [False] * 6
    assert masks[1].sum() > 1
    assert_closed(parents, masks[1])


def test_a_flat_cost_takes_every_node_with_a_chance_and_a_steep_one_fewer():
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, 12) for _ in range(3)]
    rates = [[1.0] + list(rng.uniform(0.3, 0.95, size=11)) for _ in trees]
    rates[1][1] = rates[1][4] = 0.0  # nodes (and their subtrees) with no chance at all
    chances = [path_chances(t.parents, r) for t, r in zip(trees, rates)]
    positive = sum(int((c[1:] > 0).sum()) for c in chances)
    assert 10 < positive < 33
    flat_masks = allocate(chances, 0, flat, max_tokens=200)
    for c, m in zip(chances, flat_masks):
        assert (m[1:] == (c[1:] > 0)).all()
    bounded = allocate(chances, 0, flat, max_tokens=3 + 10)  # up to the bound
    assert sum(int(m[1:].sum()) for m in bounded) == 10
    steep = allocate(chances, 0, slope(1.0), max_tokens=200)
    assert 0 < sum(int(m[1:].sum()) for m in steep) < positive
    for masks in (flat_masks, bounded, steep):
        for tree, mask in zip(trees, masks):
            assert_closed(tree.parents, mask)


def test_allocate_with_no_trees_or_only_roots():
    assert allocate([], 8, flat, 16) == []
    masks = allocate([np.array([1.0]), np.array([1.0])], 0, flat, 16)
    assert [m.tolist() for m in masks] == [[True], [True]]


# ---- AcceptanceRates --------------------------------------------------------------------------
# root 0; 1, 2 under the root; 3, 4 under 1; 5 under 2
TREE = tree_from_parents([10, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 1, 2])


def test_rates_start_at_the_prior():
    rates = AcceptanceRates()
    assert all(rates.rate(key) == PRIOR_RATE for key in range(6))
    chances = rates.chances(TREE)
    assert chances[0] == 1.0 and chances[1] == pytest.approx(PRIOR_RATE) and chances[3] == pytest.approx(PRIOR_RATE**2)


def test_accepted_nodes_rise_and_offered_but_rejected_fall():
    rates = AcceptanceRates()
    for _ in range(3):
        rates.observe(TREE, np.array([0, 1, 3]))
    assert rates.rate(1) > PRIOR_RATE and rates.rate(3) > PRIOR_RATE  # accepted
    assert rates.rate(2) < PRIOR_RATE and rates.rate(4) < PRIOR_RATE  # offered (parent accepted), rejected
    assert rates.rate(5) == PRIOR_RATE  # its parent was never accepted: never offered
    assert rates.offered == {1: 3, 2: 3, 3: 3, 4: 3} and rates.accepted == {1: 3, 2: 0, 3: 3, 4: 0}


def test_a_requests_rates_start_from_and_feed_the_global_ones():
    overall = AcceptanceRates()
    first = AcceptanceRates(prior=overall)
    for _ in range(4):
        first.observe(TREE, np.array([0, 2, 5]))
    assert overall.rate(2) > PRIOR_RATE and overall.rate(1) < PRIOR_RATE  # the global rates saw it too
    newcomer = AcceptanceRates(prior=overall)
    assert newcomer.rate(2) == overall.rate(2) and newcomer.rate(1) == overall.rate(1)
    assert first.rate(2) > overall.rate(2)  # its own observations count on top of the blend


def test_chances_are_products_along_paths():
    rates = AcceptanceRates()
    rates.observe(TREE, np.array([0, 1, 4]))
    rates.observe(TREE, np.array([0, 2]))
    chances = rates.chances(TREE)
    for node in range(1, len(TREE)):
        parent = TREE.parents[node]
        assert chances[node] == pytest.approx(chances[parent] * rates.rate(int(TREE.source[node])))
        assert chances[node] <= chances[parent]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 15), st.integers(0, 2**31), st.integers(1, 6))
def test_chances_never_rise_down_a_path(size, seed, observations):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, size)
    rates = AcceptanceRates(prior=AcceptanceRates())
    for _ in range(observations):
        rates.observe(tree, tree.path_to(int(rng.integers(0, size))))
    chances = rates.chances(tree)
    assert chances[0] == 1.0 and ((0 < chances) & (chances <= 1)).all()
    assert (chances[1:] <= chances[tree.parents[1:]]).all()


# ---- PassCost -----------------------------------------------------------------------------------
def test_the_prior_is_interpolated_and_extended_linearly():
    cost = PassCost({1: 2.0, 8: 4.0, 16: 8.0})
    assert cost(1) == pytest.approx(2.0) and cost(8) == pytest.approx(4.0)
    assert cost(4) == pytest.approx(2.0 + 3 / 7 * 2.0)
    assert cost(12) == pytest.approx(6.0)
    assert cost(32) == pytest.approx(8.0 + 16 * 0.5)  # the last segment's slope, past the last point
    generic = PassCost()
    assert generic(1) == pytest.approx(1.0) and generic(64) == pytest.approx(1 + 63 * DEFAULT_SLOPE)
    assert generic(128) == pytest.approx(1 + 127 * DEFAULT_SLOPE)
    assert np.allclose(generic(np.array([1, 33, 64])), [1.0, 1 + 32 * DEFAULT_SLOPE, 1 + 63 * DEFAULT_SLOPE])


def test_timed_buckets_replace_the_prior_inside_and_scale_it_outside():
    cost = PassCost({1: 1.0, 64: 4.0, 256: 10.0})
    cost.observe(4, 0.010)
    cost.observe(16, 0.030)
    assert cost(4) == pytest.approx(0.010) and cost(16) == pytest.approx(0.030)
    assert cost(10) == pytest.approx(0.010 + 6 / 12 * 0.020)  # between timed buckets: the timings
    assert cost(1) == pytest.approx(cost.prior(np.array(1.0)) * 0.010 / cost.prior(np.array(4.0)))
    assert cost(128) == pytest.approx(cost.prior(np.array(128.0)) * 0.030 / cost.prior(np.array(16.0)))
    cost.observe(3, 0.020)  # bucket 4 again: a running mean
    assert cost(4) == pytest.approx((1 - COST_SMOOTHING) * 0.010 + COST_SMOOTHING * 0.020)
    cost.observe(5, 0.5)  # 5 tokens time the 8-token bucket
    assert cost(8) == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6),
    st.lists(st.tuples(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256]), st.floats(0.0, 0.05)), max_size=6, unique_by=lambda t: t[0]),
)
def test_the_cost_never_falls_with_more_tokens(prior_steps, timed):
    xs = [1, 3, 10, 40, 100, 300][: len(prior_steps)]
    cost = PassCost(dict(zip(xs, 0.1 + np.cumsum(prior_steps))))
    seconds = 0.001 + np.cumsum([s for _, s in sorted(timed)])
    for (bucket, _), value in zip(sorted(timed), seconds):
        cost.observe(bucket, float(value))
    curve = cost(np.arange(1, 600))
    assert (curve > 0).all()
    assert (np.diff(curve) >= -1e-12 * curve[1:]).all()


# ---- trim -----------------------------------------------------------------------------------------
def test_trim_keeps_the_tree_when_all_are_kept():
    assert trim(TREE, np.ones(len(TREE), dtype=bool)) is TREE


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 20), st.integers(0, 2**31))
def test_trim_gives_a_valid_pruned_tree(size, seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, size)
    keep = rng.random(size) < 0.6
    keep[0] = True
    for node in range(1, size):  # closed under parents, as allocate gives it
        keep[node] &= keep[tree.parents[node]]
    if keep.all():
        keep[-1] = False  # a leaf (the last node has no children)
    cut = trim(tree, keep)
    kept = np.flatnonzero(keep)
    assert cut is not tree and len(cut) == len(kept)
    assert cut.tokens.tolist() == tree.tokens[kept].tolist()
    assert cut.source.tolist() == tree.source[kept].tolist()
    assert cut.parents[0] == -1 and (cut.parents[1:] < np.arange(1, len(cut))).all() and (cut.parents[1:] >= 0).all()
    for node in range(1, len(cut)):  # same parent, depth and ancestors as in the original
        assert kept[cut.parents[node]] == tree.parents[kept[node]]
        assert cut.depths[node] == cut.depths[cut.parents[node]] + 1
        assert cut.path_to(node).tolist() == [int(np.flatnonzero(kept == a)[0]) for a in tree.path_to(kept[node])]
