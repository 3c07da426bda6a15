"""Every drafter by name: how it is built, what it needs, and one line on what it does.

The CLI's choices, the engine, the bench methods and the README's table all come from DRAFTERS:
a new drafter is one module plus one entry here. Builders take `DraftResources`, what the engine
owns and lends to drafters (the vocabulary, the tree, a datastore, a draft runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InvalidOptionError
from ..trees.choice import TreeChoice
from .auto import AutoDrafter
from .base import Drafter
from .draft_model import DraftModelDrafter, DraftShape
from .lookup import LookupDrafter
from .plain import PlainDrafter
from .recycling import TokenRecyclingDrafter
from .retrieval import RetrievalDrafter

MERGED_EXTRA_NODES = 12  # what lookup and retrieval add to the recycling tree when all three merge


@dataclass
class DraftResources:
    """What a drafter is built from. `recycling` makes the Token Recycling drafter of this build:
    the engine's shared one (hot start) or one with a table of its own."""

    vocab_size: int
    tree: TreeChoice
    recycling: Callable[[], TokenRecyclingDrafter]
    datastore: object | None = None  # a SuffixAutomaton for retrieval
    draft_runner: Callable[[], object] | None = None  # the draft model's runner, built on first use
    draft_shape: DraftShape | None = None


@dataclass(frozen=True)
class DrafterEntry:
    name: str
    build: Callable[[DraftResources], Drafter]
    description: str
    uses_datastore: bool = False
    needs_draft_model: bool = False


def _merged_arms(resources: DraftResources):
    nodes = max(resources.tree.template.num_nodes, 1)
    everything = (("tr", "lookup", "retrieval"), nodes + MERGED_EXTRA_NODES)
    arms = [(("tr",), nodes), (("lookup",), 8), (("tr", "lookup"), nodes + 6), everything]
    return everything, arms


def _parts(resources: DraftResources) -> dict[str, Drafter]:
    return {"tr": resources.recycling(), "lookup": LookupDrafter(), "retrieval": RetrievalDrafter(resources.datastore)}


def _merged(resources: DraftResources) -> Drafter:
    everything, _ = _merged_arms(resources)
    return AutoDrafter(_parts(resources), [everything], adapt=False)


def _auto(resources: DraftResources) -> Drafter:
    return AutoDrafter(_parts(resources), _merged_arms(resources)[1])


def _draft_model(resources: DraftResources) -> Drafter:
    if resources.draft_runner is None:
        raise InvalidOptionError("the draft-model drafter needs a draft model (--draft)")
    shape = resources.draft_shape or DraftShape.parse("chain")
    return DraftModelDrafter(resources.draft_runner(), shape.branching, shape.adaptive, beam=shape.beam)


DRAFTERS: dict[str, DrafterEntry] = {
    entry.name: entry
    for entry in (
        DrafterEntry("recycling", lambda r: r.recycling(), "Token Recycling: the model's own top-k from earlier steps, grown into a tree"),
        DrafterEntry("lookup", lambda r: LookupDrafter(), "prompt lookup: continuations of earlier occurrences of the text's last tokens, merged in one tree"),
        DrafterEntry("retrieval", lambda r: RetrievalDrafter(r.datastore), "the most frequent continuations in a suffix automaton over the datastore, prompts and earlier outputs", uses_datastore=True),
        DrafterEntry("merged", _merged, "Token Recycling, lookup and retrieval merged in one tree", uses_datastore=True),
        DrafterEntry("auto", _auto, "a bandit picks among Token Recycling, lookup, retrieval and their merges by tokens/s, per kind of evidence", uses_datastore=True),
        DrafterEntry("draft-model", _draft_model, "drafts sampled from a draft model: a chain, an RSD tree or a stochastic beam (--draft, --draft-shape)", needs_draft_model=True),
        DrafterEntry("plain", lambda r: PlainDrafter(), "no drafts: one token per forward pass on the same runner (the baseline)"),
    )
}  # fmt: skip

# auto (Token Recycling, prompt lookup and retrieval, chosen by a bandit): at least as fast as Token
# Recycling alone, paired per turn, on both bundled models with bf16, int4 and gguf weights (1.01x
# to 1.14x; README "The race with llama.cpp"). `recycling` is Token Recycling alone.
DEFAULT_DRAFTER = "auto"
TRAIN_FREE = tuple(name for name, entry in DRAFTERS.items() if not entry.needs_draft_model and name != "plain")


def drafter_entry(name: str) -> DrafterEntry:
    if name not in DRAFTERS:
        raise InvalidOptionError(f"unknown drafter '{name}' ({', '.join(DRAFTERS)})")
    return DRAFTERS[name]


def build_drafter(name: str, resources: DraftResources) -> Drafter:
    return drafter_entry(name).build(resources)


__all__ = ["DRAFTERS", "TRAIN_FREE", "DraftResources", "DrafterEntry", "build_drafter", "drafter_entry"]
