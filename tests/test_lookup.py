"""The lookup drafter: its incremental n-gram index against brute force, and exactness of
decoding with its trees, greedy and sampled."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import decode_alone
from tokenrecycle.drafters.lookup import LookupDrafter, NgramIndex, merge_branches
from tokenrecycle.sampling import Sampling
from tokenrecycle.verify import SamplingVerifier

from enumeration import output_distribution
from fakes import ScriptedRunner, cycle_model, sequential_greedy
from test_sampling import PROMPT, SETTINGS, TOKENS, SoftRunner, assert_same, plain_distribution


def brute_force(tokens: list[int], max_ngram: int, min_ngram: int, count: int, depth: int) -> tuple[int, list[list[int]]]:
    end = len(tokens)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        suffix = tokens[end - n :]
        found = []
        for position in range(end - 1, n - 1, -1):  # most recent first, the suffix itself excluded
            if tokens[position - n : position] == suffix:
                continuation = tokens[position : position + depth]
                if continuation and continuation not in found:
                    found.append(continuation)
            if len(found) == count:
                break
        if found:
            return n, found
    return 0, []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=60),
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 20),
)  # fmt: skip
def test_index_matches_brute_force_as_it_grows(tokens, max_ngram, min_ngram, count, depth, chunk):
    min_ngram = min(min_ngram, max_ngram)
    index = NgramIndex(max_ngram)
    for start in range(0, len(tokens), chunk):  # grown piece by piece, as decoding does
        index.extend(tokens[start : start + chunk])
        seen = tokens[: start + chunk]
        assert index.continuations(min_ngram, count, depth) == brute_force(seen, max_ngram, min_ngram, count, depth)


def test_merged_branches_share_prefixes_and_respect_the_budget():
    tree = merge_branches(9, [[1, 2, 3], [1, 2, 4], [5]], budget=10)
    assert tree.tokens.tolist() == [9, 1, 2, 3, 4, 5]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    assert len(merge_branches(9, [[1, 2, 3], [4, 5, 6]], budget=4)) == 5  # root + 4 nodes


def test_greedy_lookup_is_exact_and_copies_repetitive_text():
    model = cycle_model(period=7)
    runner = ScriptedRunner(model, vocab_size=16)
    prompt = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2], dtype=np.int64)
    out, lengths = [], []
    for step in decode_alone(runner, LookupDrafter(), prompt, 60):
        out += step.tokens
        lengths.append(len(step.tokens))
    assert out == sequential_greedy(model, prompt.tolist(), 60)
    assert max(lengths) == 7  # six drafted tokens and the bonus


def test_evidence_is_the_length_of_the_suffix_continued():
    drafter = LookupDrafter(max_ngram=3)
    drafter.start(np.array([5, 6, 7, 8, 5, 6]), None)
    drafter.propose(7)  # ... 5 6 7 occurred before, followed by 8
    assert drafter.evidence == 3
    drafter.propose(9)  # 9 never occurred
    assert drafter.evidence == 0


def test_sampling_with_lookup_drafts_has_plain_samplings_distribution():
    prompt_with_repeats = np.concatenate([PROMPT, PROMPT, PROMPT])
    for sampling in SETTINGS[:3]:
        actual = output_distribution(
            SoftRunner, lambda: LookupDrafter(max_ngram=2, depth=3), lambda d: SamplingVerifier(sampling, d), prompt_with_repeats, TOKENS
        )
        expected = plain_distribution(sampling, prompt=prompt_with_repeats)
        assert_same(actual, expected)
