"""A suffix automaton over token sequences: every substring of a text, with how often it occurs.

Built online in linear time (Blumer et al.; the classic construction). Each state stands for a
set of substrings with the same end positions; `count[s]` is how many times they occur, and
`count[next(s, t)] / count[s]` is how often token t followed them: the frequencies a retrieval
drafter turns into a tree. Several texts (documents) are joined with a separator token that
never matches, so no substring spans two documents.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from .errors import CorruptTableError
from .files import atomic_write

SEPARATOR = -1  # between documents: a token no text contains


class SuffixAutomaton:
    def __init__(self):
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.own: list[int] = [0]  # 1 for the state created by appending a token (an end position)
        self.last = 0
        self.tokens = 0
        self._count: np.ndarray | None = None

    # ---- building ------------------------------------------------------------------------
    def add_document(self, tokens) -> None:
        """Append a text; substrings never span documents."""
        if self.tokens:
            self._extend(SEPARATOR)
        for token in tokens:
            self._extend(int(token))

    def _extend(self, token: int) -> None:
        self._count = None
        self.tokens += 1
        current = self._new_state(self.length[self.last] + 1, own=1)
        state = self.last
        while state != -1 and token not in self.next[state]:
            self.next[state][token] = current
            state = self.link[state]
        if state == -1:
            self.link[current] = 0
        else:
            target = self.next[state][token]
            if self.length[state] + 1 == self.length[target]:
                self.link[current] = target
            else:
                clone = self._new_state(self.length[state] + 1, own=0)
                self.next[clone] = dict(self.next[target])
                self.link[clone] = self.link[target]
                while state != -1 and self.next[state].get(token) == target:
                    self.next[state][token] = clone
                    state = self.link[state]
                self.link[target] = self.link[current] = clone
        self.last = current

    def _new_state(self, length: int, own: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.own.append(own)
        return len(self.length) - 1

    # ---- reading -------------------------------------------------------------------------
    @property
    def count(self) -> np.ndarray:
        """Occurrences of each state's substrings (computed once after each change)."""
        if self._count is None:
            count = np.array(self.own, dtype=np.int64)
            for state in sorted(range(1, len(self.length)), key=self.length.__getitem__, reverse=True):
                count[self.link[state]] += count[state]
            self._count = count
        return self._count

    def step(self, state: int, matched: int, token: int) -> tuple[int, int]:
        """Match one more token of a text: (state, length) of its longest suffix that occurs."""
        while state != -1 and token not in self.next[state]:
            state = self.link[state]
            matched = self.length[state] if state != -1 else 0
        if state == -1:
            return 0, 0
        return self.next[state][token], matched + 1

    def occurrences(self, tokens) -> int:
        """How many times a token sequence occurs (0 if it does not)."""
        state = 0
        for token in tokens:
            state = self.next[state].get(int(token))
            if state is None:
                return 0
        return int(self.count[state]) if tokens else self.tokens

    def continuations(self, state: int, budget: int, depth: int, min_count: int = 1) -> list[tuple[list[int], float]]:
        """The `budget` most frequent continuations of a state's text, as (tokens, share of its
        occurrences), best first, each at most `depth` tokens; a continuation's prefixes come first."""
        count = self.count
        if count[state] == 0:
            return []
        heap = [(-1.0, (), state)]
        found: list[tuple[list[int], float]] = []
        while heap and len(found) < budget:
            negative, path, node = heapq.heappop(heap)
            if path:
                found.append((list(path), -negative))
            if len(path) == depth:
                continue
            for token, child in self.next[node].items():
                if token != SEPARATOR and count[child] >= min_count:
                    share = -negative * count[child] / count[node]
                    heapq.heappush(heap, (-share, path + (token,), child))
        return found

    # ---- storage -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """A datastore file: the automaton as flat arrays (numpy .npz), written whole or not at all."""
        sources = np.repeat(np.arange(len(self.next)), [len(n) for n in self.next])
        tokens = np.fromiter((t for n in self.next for t in n), dtype=np.int64, count=len(sources))
        targets = np.fromiter((s for n in self.next for s in n.values()), dtype=np.int64, count=len(sources))
        with atomic_write(path) as file:  # a file object: numpy writes it exactly there, adding no .npz
            np.savez(
                file, sources=sources, tokens=tokens, targets=targets, link=np.array(self.link), length=np.array(self.length),
                own=np.array(self.own), last=self.last, size=self.tokens,
            )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> SuffixAutomaton:
        try:
            with np.load(path, allow_pickle=False) as data:
                sources, tokens, targets = data["sources"], data["tokens"], data["targets"]
                automaton = cls()
                automaton.link, automaton.length, automaton.own = data["link"].tolist(), data["length"].tolist(), data["own"].tolist()
                automaton.last, automaton.tokens = int(data["last"]), int(data["size"])
        except FileNotFoundError:
            raise CorruptTableError(f"no datastore file at {path}") from None
        except Exception as exc:  # numpy raises many kinds for a damaged file
            raise CorruptTableError(f"cannot read datastore {path}: {exc.__class__.__name__}") from None
        automaton.next = [{} for _ in automaton.length]
        for source, token, target in zip(sources.tolist(), tokens.tolist(), targets.tolist()):
            automaton.next[source][token] = target
        return automaton
