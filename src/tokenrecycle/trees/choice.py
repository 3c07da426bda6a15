"""Which tree an engine drafts with: a name, a file of rank paths, a dynamic budget, or the tree
tuned for this machine. Every choice resolves into one TreeChoice that carries its reason (and,
for a tuned tree, the profile it came from)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..errors import InvalidTemplateError
from .templates import TEMPLATES
from .design import rank_budget_template
from .structure import CompiledTree, compile_template, trim_to_topk

AUTO = "auto"  # the tree tuned for this machine (tokenrecycle tune), else the static default below
ADAPTIVE = "adaptive"  # starts from the tuned tree and follows each request's acceptance
TUNED = (AUTO, ADAPTIVE)  # trees that come from the tuning profile

# Chosen by measured sweeps on MT-Bench prompts (2-core AVX-512-BF16 CPU): each extra tree token
# costs more in float32 than in bfloat16, so the float32 tree is smaller, and int4 matrix kernels
# cost almost one token's time per extra row, so int4 gets the smallest. Other machines differ.
DEFAULT_TREE = {"float32": "tr4", "bfloat16": "tr8", "int4": "tr2", "gguf": "tr2"}


def default_tree(dtype: str, quantize: str | None) -> str:
    return DEFAULT_TREE[quantize or dtype]


@dataclass(frozen=True)
class TreeChoice:
    template: CompiledTree
    budget: int | None = None  # dynamic tree: verify only this many of the template's nodes
    name: str = "custom"  # what the user asked for (a name, dynN, auto, adaptive), or custom
    reason: str = "asked for"
    profile: object | None = None  # the tuning profile a tuned tree came from (an adaptive tree starts there)
    problem: str | None = None  # why a profile on disk could not be used (damaged, another setup)

    @property
    def adaptive(self) -> bool:
        return self.name == ADAPTIVE


def tuned_tree(tree: str, topk: int, profile, static_default: str, problem: str | None = None) -> TreeChoice:
    """`auto` or `adaptive` from this machine's tuning profile; without one, the static default
    tree, with the reason (and `problem`, when a profile exists but cannot be used)."""
    if profile is None:
        why = problem or "no tuning profile for this setup yet (run tokenrecycle tune)"
        return replace(resolve_tree(static_default, topk), reason=f"static default: {why}", problem=problem)
    adapting = " (start; it follows each request's acceptance)" if tree == ADAPTIVE else ""
    template = compile_template(trim_to_topk(profile.plan.paths, topk), topk)
    return TreeChoice(template, name=tree, reason=f"tuned on this machine: {profile.summary()}{adapting}", profile=profile)


DYNAMIC_PREFIX = "dyn"


def resolve_tree(tree: str | Sequence[Sequence[int]], topk: int) -> TreeChoice:
    """A named template (trimmed to ranks below topk), `dynN` (the N most probable nodes of a wide,
    deep template, chosen afresh each step), a JSON file of rank paths, or the paths themselves."""
    if isinstance(tree, str):
        if tree in TEMPLATES:
            return TreeChoice(compile_template(trim_to_topk(TEMPLATES[tree], topk), topk), name=tree)
        if tree.startswith(DYNAMIC_PREFIX) and tree[len(DYNAMIC_PREFIX) :].isdigit():
            budget = int(tree[len(DYNAMIC_PREFIX) :])
            if budget < 1:
                raise InvalidTemplateError(f"dynamic tree '{tree}' needs a node budget of at least 1")
            return TreeChoice(compile_template(rank_budget_template(8, 2, topk), topk), budget, name=tree)
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
