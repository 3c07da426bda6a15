"""The Token Recycling table: seeding, drafting, updating, saving."""

import numpy as np
import pytest
import torch

from tokenrecycle.drafters import TokenRecyclingDrafter
from tokenrecycle.drafters.recycling import UNWRITTEN
from tokenrecycle.errors import CorruptTableError, InvalidOptionError
from tokenrecycle.trees import compile_template, prune

V, K = 10, 2
TEMPLATE = compile_template([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], topk=K)


def logits_ranking(*rankings):
    """Logits whose top-K in order is each given ranking."""
    logits = torch.zeros(len(rankings), V)
    for row, ranking in enumerate(rankings):
        for rank, token in enumerate(ranking):
            logits[row, token] = 10.0 - rank
    return logits


def drafter(**kwargs):
    return TokenRecyclingDrafter(V, TEMPLATE, topk=K, **kwargs)


def test_fresh_table_drafts_nothing():
    d = drafter()
    assert (d.table == UNWRITTEN).all()
    tree = d.propose(3)
    assert tree.tokens.tolist() == [3] and len(tree) == 1


def test_prefill_logits_seed_the_rows_of_prompt_tokens():
    d = drafter()
    d.start(np.array([3, 4]), logits_ranking([4, 5], [6, 7]))
    assert d.table[3].tolist() == [4, 5] and d.table[4].tolist() == [6, 7]
    # root 3 -> (0)=4, (1)=5; 4 -> (0,0)=6, (0,1)=7; row 6 unwritten: (0,0,0) dropped
    tree = d.propose(3)
    assert tree.tokens.tolist() == [3, 4, 5, 6, 7]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1]


def test_observe_overwrites_rows_with_every_node_topk():
    d = drafter()
    d.start(np.array([3, 4]), logits_ranking([4, 5], [6, 7]))
    tree = d.propose(3)  # tokens 3, 4, 5, 6, 7
    d.observe(tree, logits_ranking([4, 9], [8, 1], [2, 3], [1, 2], [0, 1]), accepted=np.array([0, 1]))
    assert d.table[[3, 4, 5, 6, 7]].tolist() == [[4, 9], [8, 1], [2, 3], [1, 2], [0, 1]]


def test_accepted_node_wins_when_a_token_repeats_in_the_tree():
    d = drafter()
    compiled = compile_template([(0,), (1,)], topk=K)
    tree = prune(compiled, np.array([3, 5, 5]), np.ones(3, dtype=bool))  # token 5 twice
    d.observe(tree, logits_ranking([5, 6], [1, 2], [7, 8]), accepted=np.array([0, 1]))
    assert d.table[5].tolist() == [1, 2]  # from the accepted node 1, not the later node 2


def test_duplicate_siblings_are_dropped():
    d = drafter()
    d.table[3] = [4, 4]  # only possible from an edited or foreign table; must not waste a node
    assert d.propose(3).tokens.tolist() == [3, 4]


def test_cold_start_resets_hot_start_keeps():
    for hot, expected in [(True, [8, 9]), (False, [UNWRITTEN, UNWRITTEN])]:
        d = drafter(hot_start=hot)
        d.table[1] = [8, 9]
        d.start(np.array([3]), logits_ranking([4, 5]))
        assert d.table[1].tolist() == expected


def test_topk_must_cover_the_template():
    with pytest.raises(InvalidOptionError, match="beyond topk"):
        TokenRecyclingDrafter(V, compile_template([(0,), (3,)], topk=4), topk=2)
    with pytest.raises(InvalidOptionError):
        TokenRecyclingDrafter(V, compile_template([], topk=1), topk=0)


def test_memory_is_reported_in_bytes():
    assert drafter().memory_bytes == V * K * 4
    assert TokenRecyclingDrafter(49152, TEMPLATE, topk=8).memory_bytes == 49152 * 8 * 4


def test_save_and_load_round_trip(tmp_path):
    d = drafter()
    d.start(np.array([3, 4]), logits_ranking([4, 5], [6, 7]))
    d.save(tmp_path / "t.npz")
    e = drafter()
    e.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(d.table, e.table)
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left behind


def test_corrupt_or_foreign_tables_are_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a table")
    with pytest.raises(CorruptTableError, match="cannot read"):
        drafter().load(bad)
    with pytest.raises(CorruptTableError, match="no table file"):
        drafter().load(tmp_path / "missing.npz")
    other = TokenRecyclingDrafter(V + 1, TEMPLATE, topk=K)
    other.save(tmp_path / "other.npz")
    with pytest.raises(CorruptTableError, match="needs 10 x 2"):
        drafter().load(tmp_path / "other.npz")
    np.savez(tmp_path / "range.npz", table=np.full((V, K), V + 5, dtype=np.int32))
    with pytest.raises(CorruptTableError, match="outside the vocabulary"):
        drafter().load(tmp_path / "range.npz")


def logits_with_probs(*rows):
    """Logits whose softmax puts the given probabilities on the given tokens (rest spread thin)."""
    logits = torch.full((len(rows), V), -30.0)
    for i, row in enumerate(rows):
        for token, prob in row.items():
            logits[i, token] = float(np.log(prob))
    return logits


def test_budget_keeps_the_most_probable_paths():
    d = drafter(budget=2)
    assert d.memory_bytes == V * K * 4 + V * K * 2  # token ids and float16 probabilities
    # after 3: 4 (p=.9) or 5 (.1); after 4: 6 (.8) or 7 (.2)
    d.start(np.array([3, 4]), logits_with_probs({4: 0.9, 5: 0.1}, {6: 0.8, 7: 0.2}))
    tree = d.propose(3)
    # path chances: 4 -> .9, 4-6 -> .72, 4-7 -> .18, 5 -> .1
    assert tree.tokens.tolist() == [3, 4, 6]
    assert tree.depths.tolist() == [0, 1, 2]


def test_budget_goes_wide_when_the_model_was_unsure():
    d = drafter(budget=2)
    d.start(np.array([3, 4]), logits_with_probs({4: 0.5, 5: 0.45}, {6: 0.5, 7: 0.4}))
    # path chances: 4 -> .5, 5 -> .45, 4-6 -> .25
    assert sorted(d.propose(3).tokens.tolist()) == [3, 4, 5]


def test_budget_larger_than_the_tree_keeps_every_valid_node():
    d = drafter(budget=99)
    d.start(np.array([3, 4]), logits_with_probs({4: 0.9, 5: 0.1}, {6: 0.8, 7: 0.2}))
    assert d.propose(3).tokens.tolist() == [3, 4, 5, 6, 7]


def test_probabilities_survive_save_and_load(tmp_path):
    d = drafter(budget=2)
    d.start(np.array([3, 4]), logits_with_probs({4: 0.9, 5: 0.1}, {6: 0.8, 7: 0.2}))
    d.save(tmp_path / "t.npz")
    e = drafter(budget=2)
    e.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(d.probs, e.probs)
    assert e.propose(3).tokens.tolist() == [3, 4, 6]
