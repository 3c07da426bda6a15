"""Batching: every running request's tree in one forward pass, prompts in chunks, trees cut by the
batch's tree budget, and still each request's own tokens.

A tiny random Llama (float32) with SmolLM2's tokenizer on the fast runner. Greedy outputs equal
model.generate's and the same request's alone on an unbatched engine; seeded samples equal the
same request's alone; the exact output distribution of sampled requests batched together equals
plain sampling's; a long prompt joins without holding the others up; a failing batched pass falls
back to one pass per request.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenrecycle.engine as engine_module
from tokenrecycle import Engine, InvalidOptionError, RequestSettings, RequestState
from tokenrecycle.reference import hf_generate
from tokenrecycle.sampling import Sampling
from tokenrecycle.verify import SamplingVerifier
from enumeration import Branch, ReplayedDraws
from fakes import alone, run_all
from tiny_models import one_thread, save_tiny_llama, smollm2_tokenizer  # noqa: F401

CHUNK = 8
SLOTS = 3
TIGHT = CHUNK + SLOTS + 4  # a prompt chunk, every root and four more nodes: the budget cuts trees
LONGEST = 40  # the most new tokens any request here asks for (the greedy references' length)
RNG = np.random.default_rng(11)
PROMPTS = [
    RNG.integers(100, 40000, size=5),
    np.array([812, 4433, 96, 1020, 77] * 5),  # repeats: lookup and the table accept long drafts
    RNG.integers(100, 40000, size=30),  # four chunks
    np.array([3000]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return save_tiny_llama(tmp_path_factory.mktemp("batching") / "model", smollm2_tokenizer(), 2, seed=5)


@pytest.fixture(scope="module")
def tight(model_dir):
    """Batching with small chunks and a bound well below the trees' sizes."""
    return Engine(model_dir, dtype="float32", tree="tr16", max_slots=SLOTS, max_waiting=16, prefill_chunk=CHUNK, max_batch_tokens=TIGHT)


@pytest.fixture(scope="module")
def wide(model_dir):
    """Batching with the default bound and chunks: every tree whole."""
    return Engine(model_dir, dtype="float32", tree="tr16", max_slots=SLOTS)


@pytest.fixture(scope="module")
def unbatched(model_dir):
    return Engine(model_dir, dtype="float32", tree="tr16", max_slots=1, batching=False)


@pytest.fixture(scope="module")
def reference(tight):
    """model.generate's greedy tokens for a prompt (cached; greedy output of n tokens is the first n)."""
    cache = {}

    def tokens(prompt: np.ndarray, max_new: int) -> list[int]:
        key = tuple(int(t) for t in prompt)
        if key not in cache:
            cache[key] = hf_generate(tight.loaded.model, prompt, LONGEST, tight.eos_ids)
        return cache[key][:max_new]

    return tokens


@contextmanager
def recorded(runner):
    """Record the runner's passes: forward_batch calls as lists of (slot, tree), forward_tree calls."""
    calls, singles = [], []
    batch, single = runner.forward_batch, runner.forward_tree

    def forward_batch(items):
        calls.append(list(items))
        return batch(items)

    def forward_tree(slot, tree):
        singles.append((slot, tree))
        return single(slot, tree)

    runner.forward_batch, runner.forward_tree = forward_batch, forward_tree
    try:
        yield calls, singles
    finally:
        del runner.forward_batch, runner.forward_tree  # the class's methods again


def test_one_step_is_one_pass_holding_every_running_request(wide, reference):
    wide.set_tree("tr16")
    run_all(wide, [wide.submit(p, RequestSettings(10)) for p in PROMPTS[:3]])  # the table learns: real trees
    requests = [wide.submit(p, RequestSettings(10)) for p in PROMPTS[:3]]
    with recorded(wide.runner) as (calls, singles):
        for step in range(4):
            before = len(calls)
            updates = wide.step()
            assert len(calls) == before + 1, "one forward_batch call per step"
            assert sorted(slot for slot, _ in calls[-1]) == sorted(r.slot for r in requests)
            if step:  # the first step held the prompts (whole: each fits one chunk of 64)
                assert {u.request for u in updates} == set(requests) and all(u.tokens for u in updates)
        assert not singles, "forward_tree is not used while batching"
        assert [len(tree) for _, tree in calls[0]] == [len(p) for p in PROMPTS[:3]]
        assert max(len(tree) for items in calls[1:] for _, tree in items) > 1
    results = run_all(wide, requests)
    assert [r.token_ids for r in results] == [reference(p, 10) for p in PROMPTS[:3]]


@st.composite
def random_prompts(draw):
    length = draw(st.sampled_from([1, 3, 8, 9, 17, 26, 40]))  # within a chunk, on its edge, several chunks
    return np.random.default_rng(draw(st.integers(0, 50))).integers(100, 40000, size=length)


ARRIVALS = st.lists(
    st.tuples(
        st.integers(0, 6),  # the step it arrives at
        random_prompts() | st.sampled_from(PROMPTS),
        st.integers(1, 12),  # max_new_tokens
        st.one_of(st.none(), st.integers(0, 5)),  # cancelled this many steps after arriving
        st.sampled_from(["recycling", "lookup", "merged", "plain", "auto"]),
    ),
    min_size=1,
    max_size=6,
)


def test_batched_requests_arriving_and_cancelled_at_any_step_keep_their_tokens(tight, unbatched, reference, monkeypatch):
    alone_cache, cuts, passes = {}, [], []
    real_trim = engine_module.trim
    monkeypatch.setattr(engine_module, "trim", lambda tree, keep: cuts.append(not keep.all()) or real_trim(tree, keep))

    def alone_tokens(prompt, max_new, drafter, tree):
        key = (tuple(prompt.tolist()), max_new, drafter, tree)
        if key not in alone_cache:
            unbatched.set_tree(tree)
            alone_cache[key] = alone(unbatched, prompt, RequestSettings(max_new, drafter=drafter)).token_ids
        return alone_cache[key]

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ARRIVALS, st.sampled_from(["tr4", "tr16", "dyn16"]))
    def check(plan, tree):
        tight.set_tree(tree)
        for _ in range(2):  # the second time the shared table knows these texts: real trees to cut
            run_plan(plan, tree)

    def run_plan(plan, tree):
        arrivals = sorted(plan, key=lambda item: item[0])
        submitted, step = [], 0
        with recorded(tight.runner) as (calls, _):
            while arrivals or not tight.idle:
                while arrivals and arrivals[0][0] <= step:
                    _, prompt, max_new, cancel_after, drafter = arrivals.pop(0)
                    request = tight.submit(prompt, RequestSettings(max_new, drafter=drafter))
                    submitted.append((request, prompt, max_new, drafter, None if cancel_after is None else step + cancel_after))
                for request, *_, cancel_at in submitted:
                    if cancel_at == step:
                        request.cancel()
                tight.step()
                step += 1
        passes.extend(sum(len(t) for _, t in items) for items in calls)
        assert tight.runner.free_slots == tight.runner.max_slots
        for request, prompt, max_new, drafter, cancel_at in submitted:
            tokens = request.result.token_ids
            expected = reference(prompt, max_new)
            assert alone_tokens(prompt, max_new, drafter, tree) == expected  # unbatched, alone: the same
            if request.state is RequestState.CANCELLED:
                assert cancel_at is not None and tokens == expected[: len(tokens)]
            else:
                assert request.state is RequestState.FINISHED and tokens == expected, (tree, drafter, len(prompt))

    check()
    assert max(passes) <= TIGHT  # no pass over the bound (no tree here carries sampled drafts)
    assert any(cuts), "the budget cut some tree"


@torch.inference_mode()
def lookup_prompt(model) -> np.ndarray:
    """A phrase, the model's 20 likeliest next tokens, the phrase again: whatever top-20 sample
    comes first likely occurs in the prompt, so prompt lookup drafts even for sampled text."""
    phrase = np.array([812, 4433, 96, 1020, 77] * 2)
    likeliest = torch.topk(model(torch.tensor([phrase.tolist()])).logits[0, -1], 20).indices.numpy()
    return np.concatenate([phrase, likeliest, phrase])


@pytest.mark.parametrize("drafter", ["recycling", "lookup", "auto"])
def test_seeded_samples_batched_equal_each_alone_unbatched(tight, unbatched, drafter, monkeypatch):
    tight.set_tree("tr16")
    drafted, real_trim = [], engine_module.trim  # the decoding trees the budget was given
    monkeypatch.setattr(engine_module, "trim", lambda tree, keep: drafted.append(len(tree)) or real_trim(tree, keep))
    unbatched.set_tree("tr16")

    def settings(index: int) -> RequestSettings:
        return RequestSettings(12, sampling=Sampling(temperature=0.9, top_k=20, seed=200 + index), drafter=drafter)

    prompts = [*PROMPTS, lookup_prompt(tight.loaded.model)]
    alone_tokens = [alone(unbatched, p, settings(i)).token_ids for i, p in enumerate(prompts)]
    for _ in range(2):  # the second time the shared table knows these samples: drafts are accepted
        together = run_all(tight, [tight.submit(p, settings(i)) for i, p in enumerate(prompts)])
        assert [r.token_ids for r in together] == alone_tokens
    assert len({tuple(t) for t in alone_tokens}) > 1
    assert max(drafted) > 1  # drafts were offered
    if drafter != "lookup":  # the samples do not repeat the prompt's phrase: lookup's drafts are rejected
        assert max(max(r.accepted_lengths) for r in together) > 1


# ---- the sampling distribution under batching: exact enumeration (as tests/test_sampling.py) ---
def plain_distribution(model, prompt, sampling: Sampling, tokens: int, eos_ids) -> dict[tuple, float]:
    """Plain sampling's distribution of the first `tokens` tokens, from the model directly (an
    EOS ends an outcome, as it ends a request)."""
    out = {}

    @torch.inference_mode()
    def walk(context, prefix, probability):
        if len(prefix) == tokens or (prefix and prefix[-1] in eos_ids):
            out[tuple(prefix)] = probability
            return
        probs = sampling.probabilities(model(torch.tensor([context])).logits[0, -1])
        for token in np.flatnonzero(probs.numpy() > 0).tolist():
            walk(context + [token], prefix + [token], probability * float(probs[token]))

    walk([int(t) for t in prompt], [], 1.0)
    return out


def assert_same(actual: dict, expected: dict, tolerance: float):
    for outcome in set(actual) | set(expected):
        assert actual.get(outcome, 0.0) == pytest.approx(expected.get(outcome, 0.0), abs=tolerance), outcome
    assert sum(actual.values()) == pytest.approx(1.0)


def test_sampled_requests_batched_together_have_plain_samplings_distribution(model_dir, monkeypatch):
    """Every sequence of draw outcomes, each replayed by a request of its own (enumeration.py);
    three such requests at a time share each pass with a greedy request, under a bound that cuts
    their trees. The exact distribution of the first tokens equals plain sampling's computed from
    the transformers model directly, up to the float32 difference between the two implementations'
    logits (a biased rule is off by far more: test_sampling.py)."""
    prompt, tokens = PROMPTS[0][:4].copy(), 4
    prompt = np.concatenate([prompt, prompt[:2]])  # six tokens: two chunks of four
    sampling = Sampling(temperature=1.0, top_k=3)
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=4, prefill_chunk=4, max_batch_tokens=4 + 4 + 2)
    draws_of: dict[int, ReplayedDraws] = {}
    monkeypatch.setattr(engine_module, "SamplingVerifier", lambda s: SamplingVerifier(s, draws_of[s.seed]))
    cuts, real_trim = [], engine_module.trim
    monkeypatch.setattr(engine_module, "trim", lambda tree, keep: cuts.append(not keep.all()) or real_trim(tree, keep))

    distribution, pending, live, seeds = defaultdict(float), [[]], {}, itertools.count()
    companion, accepted = None, 0
    while pending or live:
        if companion is None or companion.finished:
            companion = engine.submit(PROMPTS[1], RequestSettings(200, drafter="plain"))  # root-only trees
        while pending and engine.runner.free_slots:
            seed = next(seeds)
            draws_of[seed] = ReplayedDraws(pending.pop())
            request = engine.submit(prompt, RequestSettings(tokens, sampling=replace(sampling, seed=seed), drafter="recycling"))
            assert request.state is RequestState.RUNNING
            live[request] = draws_of[seed]
        assert len(engine.running) >= 2  # sampled requests share each pass with others
        engine.step()
        for request in [r for r in live if r.finished]:
            draws = live.pop(request)
            if request.state is RequestState.FAILED:  # its script ran out: branch on the next draw
                assert isinstance(request.error, Branch), request.error
                pending += [draws.script + [int(x)] for x in np.flatnonzero(request.error.probs.float().numpy() > 0)]
            else:
                distribution[tuple(request.result.token_ids)] += draws.probability
                accepted = max(accepted, max(request.result.accepted_lengths))
    companion.cancel()
    engine.step()
    expected = plain_distribution(engine.loaded.model, prompt, sampling, tokens, engine.eos_ids)
    assert len(expected) > 20
    assert_same(dict(distribution), expected, tolerance=1e-5)
    assert accepted >= 2, "drafts were accepted, so the rule was exercised on tree paths"
    assert any(cuts), "the budget cut trees of sampled requests (the companion's are roots alone)"


def test_a_long_prompt_joins_without_holding_the_others_up(tight, reference):
    tight.set_tree("tr16")
    running = [tight.submit(PROMPTS[0], RequestSettings(LONGEST)), tight.submit(PROMPTS[3], RequestSettings(LONGEST))]
    tight.step()  # their prompts (one chunk each)
    long_prompt = np.random.default_rng(3).integers(100, 40000, size=37)
    joiner = tight.submit(long_prompt, RequestSettings(6))
    chunks = math.ceil(len(long_prompt) / CHUNK)
    first_at = None
    for step in range(1, chunks + 1):
        updates = {u.request: u for u in tight.step()}
        assert all(r in updates and updates[r].tokens for r in running), f"step {step}: a running request made no token"
        if joiner in updates:
            first_at = step if first_at is None else first_at
    assert first_at == chunks and joiner.loop.produced >= 1
    assert not any(r.finished for r in running)  # they were running all along
    results = run_all(tight, [*running, joiner])
    assert [r.token_ids for r in results] == [reference(PROMPTS[0], LONGEST), reference(PROMPTS[3], LONGEST), reference(long_prompt, 6)]


@pytest.mark.parametrize("failing_call", [1, 3], ids=["prompt pass", "tree pass"])
def test_a_failing_batched_pass_falls_back_to_one_pass_each(tight, reference, failing_call):
    tight.set_tree("tr16")
    requests = [tight.submit(p, RequestSettings(10)) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]
    runner, batch = tight.runner, tight.runner.forward_batch
    calls, fallback = [], []

    def flaky(items):
        calls.append(len(items))
        if len(calls) == failing_call:
            raise RuntimeError("the batched kernel broke")
        return batch(items)

    def forward_tree(slot, tree):
        fallback.append(slot)
        return batch([(slot, tree)])[0]

    runner.forward_batch, runner.forward_tree = flaky, forward_tree
    try:
        results = run_all(tight, requests)
    finally:
        del runner.forward_batch, runner.forward_tree
    assert calls[failing_call - 1] > 1 and len(fallback) == calls[failing_call - 1]  # each item alone, once
    assert all(r.state is RequestState.FINISHED for r in requests), [(r.state, r.error) for r in requests]
    assert [r.token_ids for r in results] == [reference(p, 10) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]


def test_bad_batching_options_are_refused_and_described(model_dir, tight, unbatched):
    with pytest.raises(InvalidOptionError, match=r"max_batch_tokens must hold .* at least prefill_chunk \+ max_slots = 12, got 11"):
        Engine(model_dir, max_slots=4, prefill_chunk=8, max_batch_tokens=11)
    with pytest.raises(InvalidOptionError, match="prefill_chunk must be a whole number of at least 1, got 0"):
        Engine(model_dir, prefill_chunk=0)
    with pytest.raises(InvalidOptionError, match="max_batch_tokens must be a whole number of at least 1"):
        Engine(model_dir, max_batch_tokens=0)
    Engine(model_dir, dtype="float32", max_slots=4, prefill_chunk=8, max_batch_tokens=12)  # exactly enough
    assert tight.describe().batching == f"on: one pass of up to {TIGHT} tokens a step, prompts in chunks of {CHUNK}"
    assert unbatched.describe().batching.startswith("off") and not unbatched.batching
    hf = Engine(model_dir, dtype="float32", runner="hf")
    assert not hf.batching and hf.describe().batching == "off: the hf runner runs one request a pass"
