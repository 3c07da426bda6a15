"""The suffix automaton against brute force on random token strings, and the retrieval drafter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import decode_alone
from tokenrecycle.drafters.retrieval import RetrievalDrafter
from tokenrecycle.errors import CorruptTableError
from tokenrecycle.suffix_automaton import SuffixAutomaton
from tokenrecycle.verify import SamplingVerifier

from enumeration import output_distribution
from fakes import ScriptedRunner, cycle_model, sequential_greedy
from test_sampling import PROMPT, SETTINGS, TOKENS, SoftRunner, assert_same, plain_distribution

documents = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=25), min_size=1, max_size=3)


def brute_occurrences(docs, pattern) -> int:
    n = len(pattern)
    return sum(doc[i : i + n] == pattern for doc in docs for i in range(len(doc) - n + 1))


def build(docs) -> SuffixAutomaton:
    automaton = SuffixAutomaton()
    for doc in docs:
        automaton.add_document(doc)
    return automaton


@settings(max_examples=150, deadline=None)
@given(documents, st.lists(st.integers(0, 3), min_size=1, max_size=6))
def test_occurrence_counts_match_brute_force(docs, pattern):
    assert build(docs).occurrences(pattern) == brute_occurrences(docs, pattern)


@settings(max_examples=150, deadline=None)
@given(documents, st.lists(st.integers(0, 4), min_size=1, max_size=20))
def test_matching_finds_the_longest_suffix_that_occurs(docs, query):
    automaton = build(docs)
    state, matched = 0, 0
    for end in range(1, len(query) + 1):
        state, matched = automaton.step(state, matched, query[end - 1])
        longest = max((n for n in range(end + 1) if brute_occurrences(docs, query[end - n : end]) or n == 0))
        assert matched == longest


@settings(max_examples=100, deadline=None)
@given(documents, st.lists(st.integers(0, 3), min_size=1, max_size=3), st.integers(1, 8), st.integers(1, 4))
def test_continuations_are_the_most_frequent_best_first(docs, context, budget, depth):
    automaton = build(docs)
    state = 0
    for token in context:
        state = automaton.next[state].get(token)
        if state is None:
            return
    base = brute_occurrences(docs, context)
    found = automaton.continuations(state, budget, depth)
    shares = [share for _, share in found]
    assert shares == sorted(shares, reverse=True) and len(found) <= budget
    for tokens, share in found:
        assert share == pytest.approx(brute_occurrences(docs, context + tokens) / base)
    # nothing left out was more frequent than the least frequent one kept (when the budget was full)
    if len(found) == budget:
        kept = {tuple(t) for t, _ in found}
        for n in range(1, depth + 1):
            for doc in docs:
                for i in range(len(doc) - len(context) - n + 1):
                    if doc[i : i + len(context)] == context:
                        extra = doc[i + len(context) : i + len(context) + n]
                        if tuple(extra) not in kept:
                            assert brute_occurrences(docs, context + extra) / base <= shares[-1] + 1e-12


def test_datastore_files_round_trip(tmp_path):
    automaton = build([[1, 2, 3, 1, 2, 4], [2, 3, 1]])
    automaton.save(tmp_path / "store.npz")
    loaded = SuffixAutomaton.load(tmp_path / "store.npz")
    for pattern in ([1, 2], [2, 3], [3, 1], [4], [1, 2, 3, 1]):
        assert loaded.occurrences(pattern) == automaton.occurrences(pattern)
    (tmp_path / "bad.npz").write_bytes(b"not a datastore")
    with pytest.raises(CorruptTableError):
        SuffixAutomaton.load(tmp_path / "bad.npz")


def test_greedy_retrieval_is_exact_and_learns_from_earlier_outputs():
    model = cycle_model(period=6)
    drafter = RetrievalDrafter()
    prompt = np.array([1, 2, 3], dtype=np.int64)
    first = [t for step in decode_alone(ScriptedRunner(model, vocab_size=16), drafter, prompt, 30) for t in step.tokens]
    steps = list(decode_alone(ScriptedRunner(model, vocab_size=16), drafter, prompt, 30))
    second = [t for step in steps for t in step.tokens]
    assert first == second == sequential_greedy(model, prompt.tolist(), 30)
    assert max(len(step.tokens) for step in steps) >= 5  # the earlier output was copied


def test_evidence_grows_with_the_length_matched():
    drafter = RetrievalDrafter(build([list(range(20))]), learn=False)
    drafter.start(np.array([], dtype=np.int64), None)
    evidence = []
    for token in range(10):
        drafter.propose(token)
        evidence.append(drafter.evidence)
    assert evidence == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # 1-3 tokens matched, then 4-7, then 8+
    drafter.propose(99)  # never seen: nothing to continue
    assert drafter.evidence == 0


def test_sampling_with_retrieval_drafts_has_plain_samplings_distribution():
    corpus = build([np.random.default_rng(1).integers(0, 5, size=200).tolist()])
    for sampling in SETTINGS[:3]:
        actual = output_distribution(
            SoftRunner, lambda: RetrievalDrafter(corpus, learn=False), lambda d: SamplingVerifier(sampling, d), PROMPT, TOKENS
        )
        assert_same(actual, plain_distribution(sampling))


def test_index_command_builds_a_datastore_the_bench_can_use(tmp_path, capsys):
    from tokenrecycle.cli import main

    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 5)
    records = [{"text": "def add(a, b):\n    return a + b"}, {"turns": ["hello", "world"]}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = tmp_path / "store.npz"
    assert main(["index", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and "built in" in out
    automaton = SuffixAutomaton.load(store)
    assert automaton.occurrences([]) == automaton.tokens  # the empty pattern: every position
    assert main(["index", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "cannot read corpus file" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
