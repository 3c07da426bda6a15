"""Which tree a generator drafts with: a name, a file of rank paths, a dynamic budget, or the
tree tuned for this machine (resolved by the generator, which knows the machine)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InvalidTemplateError
from .templates import TEMPLATES
from .design import rank_budget_template
from .structure import CompiledTree, compile_template

AUTO = "auto"  # the tree tuned for this machine (tokenrecycle tune), else the static default below
ADAPTIVE = "adaptive"  # starts from the tuned tree and follows each request's acceptance
TUNED = (AUTO, ADAPTIVE)  # trees that come from the tuning profile

# Chosen by measured sweeps on MT-Bench prompts (2-core AVX-512-BF16 CPU): each extra tree token
# costs more in float32 than in bfloat16, so the float32 tree is smaller, and int4 matrix kernels
# cost almost one token's time per extra row, so int4 gets the smallest. Other machines differ.
DEFAULT_TREE = {"float32": "tr4", "bfloat16": "tr8", "int4": "tr2"}


def default_tree(dtype: str, quantize: str | None) -> str:
    return DEFAULT_TREE[quantize or dtype]


@dataclass(frozen=True)
class TreeChoice:
    template: CompiledTree
    budget: int | None = None  # dynamic tree: verify only this many of the template's nodes


DYNAMIC_PREFIX = "dyn"


def resolve_tree(tree: str | Sequence[Sequence[int]], topk: int) -> TreeChoice:
    """A named template (trimmed to ranks below topk), `dynN` (the N most probable nodes of a wide,
    deep template, chosen afresh each step), a JSON file of rank paths, or the paths themselves."""
    if isinstance(tree, str):
        if tree in TEMPLATES:
            return TreeChoice(compile_template([p for p in TEMPLATES[tree] if max(p) < topk], topk))
        if tree.startswith(DYNAMIC_PREFIX) and tree[len(DYNAMIC_PREFIX) :].isdigit():
            budget = int(tree[len(DYNAMIC_PREFIX) :])
            if budget < 1:
                raise InvalidTemplateError(f"dynamic tree '{tree}' needs a node budget of at least 1")
            return TreeChoice(compile_template(rank_budget_template(8, 2, topk), topk), budget)
        path = Path(tree)
        if not path.is_file():
            names = ", ".join(TEMPLATES)
            raise InvalidTemplateError(
                f"unknown tree '{tree}' (named trees: {names}; dynN for a dynamic tree of N nodes; "
                "or a JSON file of rank paths)"
            )
        try:
            tree = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidTemplateError(f"cannot read tree file {path}: {exc}") from None
        if not isinstance(tree, list):
            raise InvalidTemplateError(f"tree file {path} must hold a JSON list of rank paths")
    return TreeChoice(compile_template(tree, topk))
