"""Draft trees: the data structures and their compilation (structure), template design (design),
the named templates (templates) and resolving a user's choice into a TreeChoice (choice)."""

from .structure import (
    CompiledTree,
    DraftTree,
    RankPath,
    ancestor_mask_from_parents,
    chain_tree,
    compile_template,
    first_of_each_sibling_token,
    limit_depth,
    offered_nodes,
    prune,
    tree_from_parents,
    tree_visibility,
    trim_to_topk,
    validate_template,
)
from .design import best_template, grow_template, rank_budget_template

__all__ = [
    "CompiledTree", "DraftTree", "RankPath", "ancestor_mask_from_parents", "best_template", "chain_tree",
    "compile_template", "first_of_each_sibling_token", "grow_template", "limit_depth", "offered_nodes",
    "prune", "rank_budget_template", "tree_from_parents", "tree_visibility", "trim_to_topk", "validate_template",
]
