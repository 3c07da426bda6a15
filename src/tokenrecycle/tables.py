"""Where the Token Recycling table lives between runs: hot start across runs, by default.

The table is kept in the cache, one file per model and topk
(`cache_root()/tables/<model>-<model key>-top<k>.npz`, the model key as the model cache's): loaded
when generate, chat or serve starts, saved when the run ends (the server: also every few seconds
while it serves, when the table changed). So each run drafts from what the earlier ones learned.
`--table none` keeps no file; `--table PATH` keeps it in PATH instead.

The file is numpy's .npz of plain arrays (read without pickle), written whole or not at all
(files.atomic_write). One that cannot be used (damaged, another model's or topk's) is ignored
with a one-line warning; the table starts empty and the next save replaces the file. The table
only changes what is drafted, never what is accepted: outputs stay those of plain decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CorruptTableError, InvalidOptionError

NO_TABLE = "none"
TABLES_FOLDER = "tables"

if TYPE_CHECKING:  # the engine is only read here
    from .engine import Engine


def check_table_choice(choice: str | None) -> None:
    if choice is not None and not choice.strip():
        raise InvalidOptionError(f"--table takes a file, or {NO_TABLE} for no file; got an empty string")


def table_path(choice: str | None, model_path: Path, topk: int) -> Path | None:
    """The table's file: None for `none`, a given path as it is, else the cache's file for the
    model and topk. `choice` as TableFile checked it."""
    if choice == NO_TABLE:
        return None
    if choice is not None:
        return Path(choice).expanduser()
    from .models import cache_root, model_key  # torch and transformers: only once a model is there

    return cache_root() / TABLES_FOLDER / f"{Path(model_path).stem}-{model_key(model_path)}-top{topk}.npz"


class TableFile:
    """The file of one engine's shared table: loaded once, written when the table has changed.
    Both return a one-line problem instead of raising: a table is never worth failing a run for."""

    def __init__(self, choice: str | None = None):
        """`choice`: None for the cache's file, `none` for no file, else a path."""
        check_table_choice(choice)
        self.choice = choice
        self._saved: tuple[int, int] | None = None  # (table, its count of writes) as the file holds it

    def path(self, engine: Engine) -> Path | None:
        return table_path(self.choice, engine.loaded.path, engine.topk)

    def load(self, engine: Engine) -> str | None:
        """Load the file, if there is one, into the engine's shared table."""
        path, drafter = self.path(engine), engine.recycling
        problem = None
        if path is not None and path.exists():
            try:
                drafter.load(path)
            except CorruptTableError as exc:
                problem = f"{exc}; starting with an empty table (the next save replaces the file)"
        self._saved = (id(drafter), drafter.writes)
        return problem

    def save(self, engine: Engine) -> str | None:
        """Write the engine's shared table, unless the file already holds it as it is."""
        path, drafter = self.path(engine), engine.recycling
        state = (id(drafter), drafter.writes)
        if path is None or state == self._saved:
            return None
        try:
            drafter.save(path)
        except OSError as exc:
            return f"cannot save the recycling table to {path}: {exc.strerror or exc}"
        self._saved = state
        return None
