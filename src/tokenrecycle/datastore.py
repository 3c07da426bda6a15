"""Retrieval datastores: a corpus tokenized and indexed once into a suffix automaton file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import InvalidOptionError
from .suffix_automaton import SuffixAutomaton


def corpus_documents(paths) -> Iterator[str]:
    """The documents of .txt files (one each) and .jsonl files (one per line)."""
    for name in paths:
        path = Path(name)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidOptionError(f"cannot read corpus file {path}: {exc.__class__.__name__}: {exc}") from None
        if path.suffix != ".jsonl":
            yield text
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield _jsonl_text(line, path, number)


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        raise InvalidOptionError(f"{path}:{number}: not JSON") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    strings = [v for v in (record.values() if isinstance(record, dict) else [record]) if isinstance(v, str)]
    strings += [s for v in (record.values() if isinstance(record, dict) else []) if isinstance(v, list) for s in v if isinstance(s, str)]
    return "\n".join(strings)


def build_datastore(paths, model: str, out: str | Path) -> tuple[SuffixAutomaton, int]:
    """Tokenize every document with the model's tokenizer, index them, write the file atomically."""
    from .models import load_tokenizer

    tokenizer = load_tokenizer(model)
    automaton = SuffixAutomaton()
    documents = 0
    for text in corpus_documents(paths):
        ids = tokenizer(text)["input_ids"]
        if ids:
            automaton.add_document(ids)
            documents += 1
    if not documents:
        raise InvalidOptionError("the corpus holds no text")
    automaton.save(out)
    return automaton, documents
