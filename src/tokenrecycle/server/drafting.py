"""Which drafter a request gets: its own `drafter` field, else the server's default.

By name the engine builds each drafter itself; drafters that need what only the server holds (its
datastore, its draft model) are built here, on the engine thread, with those.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..drafters.registry import drafter_entry
from ..engine import DEFAULT_DRAFTER, Engine


@dataclass(frozen=True)
class Drafting:
    default: str = DEFAULT_DRAFTER
    datastore: object | None = None  # a SuffixAutomaton for retrieval, merged and auto
    draft: str | None = None  # the draft model for draft-model (early-exit:N, int4 or a model)
    draft_shape: str = "chain"

    def name(self, asked: str | None) -> str:
        return asked or self.default

    def drafter_for(self, engine: Engine, asked: str | None):
        """What RequestSettings.drafter gets: a registry name, or a drafter built with the server's
        datastore or draft model. Unknown names are refused by the registry."""
        name = self.name(asked)
        entry = drafter_entry(name)
        if entry.needs_draft_model or (entry.uses_datastore and self.datastore is not None):
            return engine.build_drafter(name, datastore=self.datastore, draft=self.draft, draft_shape=self.draft_shape, own_table=False)
        return name
