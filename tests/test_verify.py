"""Greedy verification against hand-worked trees."""

import numpy as np
import torch

from tokenrecycle.trees import compile_template, prune
from tokenrecycle.verify import verify_greedy

V = 10


def tree_with(tokens):
    # root -> (0), (1); (0) -> (0,0), (0,1); (0,0) -> (0,0,0)
    compiled = compile_template([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], topk=2)
    return prune(compiled, np.array(tokens), np.ones(len(tokens), dtype=bool))


def logits_predicting(next_tokens):
    logits = torch.zeros(len(next_tokens), V)
    logits[torch.arange(len(next_tokens)), torch.tensor(next_tokens)] = 1.0
    return logits


def test_accepts_longest_matching_path_and_bonus():
    tree = tree_with([7, 1, 2, 3, 4, 5])  # nodes: root=7, (0)=1, (1)=2, (0,0)=3, (0,1)=4, (0,0,0)=5
    # model: after root -> 1, after node1 -> 4, after node4 -> 9
    path, bonus = verify_greedy(tree, logits_predicting([1, 4, 0, 0, 9, 0]))
    assert path.tolist() == [0, 1, 4] and bonus == 9


def test_nothing_accepted_gives_the_models_token():
    tree = tree_with([7, 1, 2, 3, 4, 5])
    path, bonus = verify_greedy(tree, logits_predicting([6, 0, 0, 0, 0, 0]))
    assert path.tolist() == [0] and bonus == 6


def test_full_depth_accepted():
    tree = tree_with([7, 1, 2, 3, 4, 5])
    path, bonus = verify_greedy(tree, logits_predicting([1, 3, 0, 5, 0, 8]))
    assert path.tolist() == [0, 1, 3, 5] and bonus == 8


def test_second_rank_sibling_accepted():
    tree = tree_with([7, 1, 2, 3, 4, 5])
    path, bonus = verify_greedy(tree, logits_predicting([2, 0, 6, 0, 0, 0]))
    assert path.tolist() == [0, 2] and bonus == 6


def test_a_child_matching_under_a_rejected_parent_is_not_accepted():
    tree = tree_with([7, 1, 2, 3, 4, 5])
    # (0,0)=3 would match after node1, but node1 itself is rejected (model says 2).
    path, bonus = verify_greedy(tree, logits_predicting([2, 3, 8, 0, 0, 0]))
    assert path.tolist() == [0, 2] and bonus == 8
