"""Template compilation, validation and pruning against hand-worked cases."""

import numpy as np
import pytest

from tokenrecycle.errors import InvalidTemplateError
from tokenrecycle.trees.templates import TEMPLATES
from tokenrecycle.trees import best_template, compile_template, grow_template, limit_depth, prune, validate_template

#        root(0)
#       /       \
#   (0)=1       (1)=2
#    /   \
# (0,0)=3 (0,1)=4
#   |
# (0,0,0)=5
SMALL = [(1,), (0, 0, 0), (0,), (0, 1), (0, 0)]


def test_compile_orders_breadth_first_and_builds_buffers():
    tree = compile_template(SMALL, topk=2)
    assert tree.paths == ((), (0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.ranks.tolist() == [0, 0, 1, 0, 1, 0]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.level_bounds == ((1, 3), (3, 5), (5, 6))
    assert tree.num_nodes == 5 and tree.max_depth == 3
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(tree.ancestor_mask, expected)
    assert tree.leaf_paths().tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]


def test_empty_template_is_the_root_alone():
    tree = compile_template([], topk=8)
    assert tree.num_nodes == 0 and tree.max_depth == 0 and tree.level_bounds == ()


@pytest.mark.parametrize(
    "paths, message",
    [
        ([(0,), (0, 1, 0)], "no parent"),
        ([(0,), (0,)], "duplicate"),
        ([(0,), (8,)], "outside"),
        ([(-1,)], "outside"),
        ([()], "must not be empty"),
        ([(0,), "ab"], "not a list of integer ranks"),
        ([(0.5,)], "not a list of integer ranks"),
        ([(True,)], "not a list of integer ranks"),
    ],
)
def test_invalid_templates_are_refused(paths, message):
    with pytest.raises(InvalidTemplateError, match=message):
        validate_template(paths, topk=8)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_shipped_templates_are_valid(name):
    tree = compile_template(TEMPLATES[name], topk=8)
    assert tree.num_nodes == len(TEMPLATES[name])


def test_shipped_template_sizes():
    sizes = {name: len(paths) for name, paths in TEMPLATES.items()}
    assert sizes == {"none": 0, "tr2": 2, "tr4": 4, "tr8": 8, "tr16": 16, "tr32": 32, "tr48": 48, "tr80": 80}
    depths = np.bincount([len(p) for p in TEMPLATES["tr80"]])[1:].tolist()
    assert depths == [8, 21, 25, 15, 8, 3]  # the official tree's nodes per depth


def test_prune_drops_descendants_and_reindexes_parents():
    tree = compile_template(SMALL, topk=2)
    tokens = np.array([10, 11, 12, 13, 14, 15])
    keep = np.array([True, True, True, False, True, True])  # drop (0,0): its child (0,0,0) goes too
    draft = prune(tree, tokens, keep)
    assert draft.tokens.tolist() == [10, 11, 12, 14]
    assert draft.parents.tolist() == [-1, 0, 0, 1]
    assert draft.depths.tolist() == [0, 1, 1, 2]
    assert draft.path_to(3).tolist() == [0, 1, 3]
    assert draft.source.tolist() == [0, 1, 2, 4]  # template index of each kept node
    assert prune(draft, draft.tokens, np.array([True, False, True, True])).source.tolist() == [0, 2]


def test_limit_depth():
    tree = compile_template(SMALL, topk=2)
    draft = prune(tree, np.arange(6), np.ones(6, dtype=bool))
    assert limit_depth(draft, 1).tokens.tolist() == [0, 1, 2]
    assert limit_depth(draft, 0).tokens.tolist() == [0]
    assert limit_depth(draft, 5) is draft


def test_grow_template_keeps_most_likely_children_per_depth():
    paths = grow_template([0.5, 0.3, 0.2], nodes_per_depth=[2, 2, 1])
    assert paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    compile_template(paths, topk=3)  # prefix-closed by construction


def test_best_template_prefers_deep_chains_when_children_are_likely():
    rates = {(0,): 0.6, (1,): 0.2, (0, 0): 0.8, (0, 1): 0.1, (0, 0, 0): 0.9, (1, 0): 0.9}
    # chances: (0)=.6 (0,0)=.48 (0,0,0)=.432 (1)=.2 (1,0)=.18 (0,1)=.06
    assert best_template(rates, 3) == [(0,), (0, 0), (0, 0, 0)]
    assert best_template(rates, 5) == [(0,), (0, 0), (0, 0, 0), (1,), (1, 0)]
    assert best_template(rates, 99) == [(0,), (0, 0), (0, 0, 0), (1,), (1, 0), (0, 1)]
    compile_template(best_template(rates, 4), topk=2)


def test_offered_nodes_are_the_children_of_accepted_nodes():
    from tokenrecycle.trees import offered_nodes, tree_from_parents

    tree = tree_from_parents([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 3])  # 9 -> {1 -> {3 -> 5, 4}, 2}
    offered, hit = offered_nodes(tree, np.array([0, 1, 3]))
    assert offered.tolist() == [1, 2, 3, 4, 5] and hit.tolist() == [True, False, True, False, False]
