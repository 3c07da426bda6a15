"""The engine holds many requests at once: each gives exactly the tokens it gives alone.

A tiny random Llama (float32) with SmolLM2's tokenizer: requests are interleaved step by step,
join and leave at any step, are cancelled, wait for slots and reuse them; every drafter kind and
trees small and large; greedy outputs equal model.generate's and seeded samples equal the same
request's samples alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenrecycle import Engine, EngineBusyError, InvalidOptionError, PromptTooLongError, RequestSettings, RequestState
from tokenrecycle.drafters import TokenRecyclingDrafter
from tokenrecycle.drafters.auto import AutoDrafter
from tokenrecycle.drafters.lookup import LookupDrafter
from tokenrecycle.drafters.registry import DRAFTERS
from tokenrecycle.reference import hf_generate
from tokenrecycle.sampling import Sampling
from fakes import alone, run_all
from tiny_models import one_thread, save_tiny_llama, smollm2_tokenizer  # noqa: F401

RNG = np.random.default_rng(7)
# Random ids, a repeated phrase (so lookup and the table accept long drafts), and a one-token prompt.
PROMPTS = [
    RNG.integers(100, 40000, size=11),
    np.array([812, 4433, 96, 1020, 77] * 6),
    RNG.integers(100, 40000, size=40),
    np.array([3000]),
    np.array([51, 52, 53, 51, 52, 53, 51, 52]),
]
MAX_NEW = 20
DRAFT = "early-exit:1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return save_tiny_llama(tmp_path_factory.mktemp("engine") / "model", smollm2_tokenizer(), 2, seed=3)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(model_dir, dtype="float32", tree="tr8", max_slots=3, max_waiting=8)


@pytest.fixture(scope="module")
def reference(engine):
    """model.generate's greedy tokens, per prompt and length (cached)."""
    cache = {}

    def tokens(prompt_index: int, max_new: int) -> list[int]:
        if (prompt_index, max_new) not in cache:
            cache[prompt_index, max_new] = hf_generate(engine.loaded.model, PROMPTS[prompt_index], max_new, engine.eos_ids)
        return cache[prompt_index, max_new]

    return tokens


def drafter_settings(engine, name: str):
    """A request's drafter by registry name; the draft model drafter is built with its draft."""
    if name == "draft-model":
        return lambda: engine.build_drafter("draft-model", draft=DRAFT)
    return lambda: name


@pytest.mark.parametrize("tree", ["tr2", "tr80", "dyn16"])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_interleaved_greedy_requests_equal_plain_decoding(engine, reference, tree, drafter):
    engine.set_tree(tree)
    make = drafter_settings(engine, drafter)
    for _ in range(2):  # the second time the shared table knows these texts: drafts are accepted
        # Five requests for three slots: two wait, then take the slots the first ones free.
        requests = [engine.submit(p, RequestSettings(MAX_NEW - i, drafter=make())) for i, p in enumerate(PROMPTS)]
        assert sum(r.state is RequestState.WAITING for r in requests) == 2
        results = run_all(engine, requests)
        for index, result in enumerate(results):
            assert result.token_ids == reference(index, MAX_NEW - index), (tree, drafter, index)
    if drafter in ("recycling", "merged", "auto"):
        longest = max(max(r.accepted_lengths) for r in results)
        assert longest > (1 if tree == "tr2" else 2)  # drafts were really accepted


@pytest.mark.parametrize("drafter", ["recycling", "lookup", "auto", "draft-model"])
def test_seeded_samples_are_the_same_alone_and_interleaved(engine, drafter):
    engine.set_tree("tr8")
    make = drafter_settings(engine, drafter)

    def settings(index: int) -> RequestSettings:
        return RequestSettings(MAX_NEW, sampling=Sampling(temperature=0.9, top_k=20, seed=100 + index), drafter=make())

    alone_tokens = [alone(engine, p, settings(i)).token_ids for i, p in enumerate(PROMPTS)]
    together = run_all(engine, [engine.submit(p, settings(i)) for i, p in enumerate(PROMPTS)])
    assert [r.token_ids for r in together] == alone_tokens
    assert len({tuple(t) for t in alone_tokens}) > 1  # not one degenerate sample for all


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6),  # the step it arrives at
            st.integers(0, len(PROMPTS) - 1),  # its prompt
            st.integers(1, 14),  # max_new_tokens
            st.one_of(st.none(), st.integers(0, 5)),  # cancelled this many steps after arriving
            st.sampled_from(["recycling", "lookup", "merged", "plain"]),
        ),
        min_size=1,
        max_size=7,
    )
)
def test_requests_arriving_and_cancelled_at_any_step_keep_their_tokens(engine, reference, plan):
    engine.set_tree("tr8")
    arrivals = sorted(plan, key=lambda item: item[0])
    submitted, step = [], 0
    while arrivals or not engine.idle:
        while arrivals and arrivals[0][0] <= step:
            _, prompt, max_new, cancel_after, drafter = arrivals.pop(0)
            request = engine.submit(PROMPTS[prompt], RequestSettings(max_new, drafter=drafter))
            submitted.append((request, prompt, max_new, None if cancel_after is None else step + cancel_after))
        for request, _, _, cancel_at in submitted:
            if cancel_at == step:
                request.cancel()
        engine.step()
        step += 1
    assert engine.runner.free_slots == engine.runner.max_slots
    for request, prompt, max_new, cancel_at in submitted:
        expected = reference(prompt, max_new)
        tokens = request.result.token_ids
        if request.state is RequestState.CANCELLED:
            assert tokens == expected[: len(tokens)] and cancel_at is not None
        else:
            assert request.state is RequestState.FINISHED and tokens == expected


def test_cancelling_frees_the_slot_and_leaves_the_others_unchanged(engine, reference):
    engine.set_tree("tr8")
    first, second = engine.submit(PROMPTS[0], RequestSettings(MAX_NEW)), engine.submit(PROMPTS[1], RequestSettings(MAX_NEW))
    engine.step()
    engine.step()
    free = engine.runner.free_slots
    first.cancel()
    assert first.state is RequestState.RUNNING  # takes effect before the next step
    engine.step()
    assert first.state is RequestState.CANCELLED and engine.runner.free_slots == free + 1
    assert first.result.stop_reason == "cancelled" and first.result.token_ids == reference(0, MAX_NEW)[: first.result.new_tokens]
    assert run_all(engine, [second])[0].token_ids == reference(1, MAX_NEW)


def test_a_reused_slot_holds_nothing_of_the_request_before(model_dir):
    """One slot: a long request, then a short one in the same slot, equals the short one in a fresh engine."""
    engine = Engine(model_dir, dtype="float32", tree="tr16", max_slots=1, shared_table=False)
    run_all(engine, [engine.submit(PROMPTS[2], RequestSettings(30))])
    reused = alone(engine, PROMPTS[4], RequestSettings(MAX_NEW))
    fresh = Engine(model_dir, dtype="float32", tree="tr16", max_slots=1, shared_table=False)
    assert reused.token_ids == alone(fresh, PROMPTS[4], RequestSettings(MAX_NEW)).token_ids
    assert reused.accepted_lengths == alone(fresh, PROMPTS[4], RequestSettings(MAX_NEW)).accepted_lengths


def test_requests_beyond_the_slots_wait_and_beyond_the_queue_are_refused(model_dir, reference):
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=2, max_waiting=1)
    running = [engine.submit(PROMPTS[i], RequestSettings(8)) for i in range(2)]
    waiting = engine.submit(PROMPTS[3], RequestSettings(8))
    assert [r.state for r in running] == [RequestState.RUNNING] * 2 and waiting.state is RequestState.WAITING
    with pytest.raises(EngineBusyError, match="2 slots are busy"):
        engine.submit(PROMPTS[4], RequestSettings(8))
    assert [r.token_ids for r in run_all(engine, [*running, waiting])] == [reference(0, 8), reference(1, 8), reference(3, 8)]


def test_the_cache_budget_makes_requests_wait_or_refuses_them(model_dir):
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=2, cache_tokens=200)
    with pytest.raises(PromptTooLongError, match="more KV cache than this engine has"):
        engine.submit(PROMPTS[2], RequestSettings(40))  # 40 + 40 + one tree's room: over 200
    first = engine.submit(PROMPTS[0], RequestSettings(8))
    second = engine.submit(PROMPTS[1], RequestSettings(8))  # a slot is free, the cache is not
    assert first.state is RequestState.RUNNING and second.state is RequestState.WAITING
    run_all(engine, [first, second])
    assert second.result.new_tokens == 8


def test_bad_engine_and_request_settings_are_refused(model_dir, engine):
    for options, message in [
        (dict(max_slots=0), "max_slots"), (dict(max_waiting=-1), "max_waiting"), (dict(cache_tokens=0), "cache_tokens"),
        (dict(topk=0), "topk"), (dict(dtype="float16"), "dtype"), (dict(runner="turbo"), "runner"),
        (dict(quantize="int3"), "quantize"), (dict(tree="tr7"), "unknown tree"),
    ]:  # fmt: skip
        with pytest.raises(InvalidOptionError, match=message):
            Engine(model_dir, **options)
    with pytest.raises(InvalidOptionError, match="max_new_tokens"):
        RequestSettings(0)
    assert Sampling.of(0) is None  # temperature 0 is greedy decoding, decided in one place
    with pytest.raises(InvalidOptionError, match=r"0 \(greedy\) or positive"):
        Sampling.of(-0.5)
    with pytest.raises(InvalidOptionError, match="stop string"):
        engine.submit(PROMPTS[0], RequestSettings(4, stop=[""]))
    with pytest.raises(InvalidOptionError, match="unknown drafter"):
        engine.submit(PROMPTS[0], RequestSettings(4, drafter="telepathy"))
    assert engine.idle  # nothing half-made was queued


def test_a_drafter_holding_one_texts_state_serves_one_request_at_a_time(engine):
    engine.set_tree("tr8")
    lookup = LookupDrafter()
    first = engine.submit(PROMPTS[0], RequestSettings(4, drafter=lookup))
    with pytest.raises(InvalidOptionError, match="already serves"):
        engine.submit(PROMPTS[1], RequestSettings(4, drafter=lookup))
    shared = engine.recycling
    assert isinstance(shared, TokenRecyclingDrafter) and shared.shareable
    second = engine.submit(PROMPTS[1], RequestSettings(4, drafter=shared))
    third = engine.submit(PROMPTS[2], RequestSettings(4, drafter=shared))
    run_all(engine, [first, second, third])


def test_the_default_drafter_drafts_from_the_engines_table(engine):
    engine.set_tree("tr8")
    request = engine.submit(PROMPTS[1], RequestSettings(4))
    assert isinstance(request.drafter, AutoDrafter) and request.drafter.drafters["tr"] is engine.recycling
    run_all(engine, [request])
    assert (engine.recycling.table[PROMPTS[1]] >= 0).all()  # the prompt's rows were written


def test_leaving_a_stream_early_cancels_its_request(model_dir):
    from tokenrecycle import Generator

    generator = Generator(model_dir, dtype="float32", tree="tr4")
    stream = generator.stream(PROMPTS[0], max_new_tokens=30)
    for _ in stream:
        break
    assert stream.result.stop_reason == "cancelled" and generator.engine.idle
    assert generator.runner.free_slots == generator.runner.max_slots


def test_describe_names_the_setup(engine):
    setup = engine.describe()
    assert setup.dtype == "float32" and setup.dtype_reason == "asked for float32"
    assert setup.runner == "fast" and setup.loop in ("C++ loop", "Python loop") and setup.max_slots == 3
    assert setup.tree == engine.tree.name and setup.tree_nodes == engine.tree.template.num_nodes
    assert setup.model == "model" and "/" not in setup.model  # named, not located
    assert setup.weights_bytes > 0 and setup.table_bytes == engine.recycling.memory_bytes
    assert "float32 (asked for float32)" in setup.summary()


def test_the_readmes_drafter_table_is_the_registrys():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"<!-- drafters: from drafters/registry.py -->\n(.*?)\n<!-- /drafters -->", readme, re.S)
    printed = subprocess.run([sys.executable, str(root / "scripts" / "drafter_table.py")], capture_output=True, text=True, check=True)
    assert block is not None and block.group(1) == printed.stdout.strip()
    assert all(f"| `{name}` |" in block.group(1) for name in DRAFTERS)


def test_the_readmes_engine_example_runs(model_dir):
    """The README's many-requests example, on the tiny model."""
    from tokenrecycle.sampling import Sampling

    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=4)
    a = engine.submit("Why do cats purr?", RequestSettings(max_new_tokens=12))
    b = engine.submit("Write a haiku.", RequestSettings(12, stop=["\n\n"], sampling=Sampling(0.7, seed=1), drafter="auto"))
    seen = set()
    while not engine.idle:
        for update in engine.step():
            seen.add((update.request.id, update.finished))
    assert (a.id, True) in seen and (b.id, True) in seen
    assert a.result.new_tokens == 12 and b.result.stats_line()


def test_logprobs_are_the_models_own(engine, reference):
    """Each decided token's log-probability equals log_softmax of the model's logits at its position."""
    import torch

    engine.set_tree("tr8")
    for _ in range(2):  # the second time drafts are accepted: rows come from inside the tree
        result = alone(engine, PROMPTS[1], RequestSettings(12, logprobs=3))
    assert max(result.accepted_lengths) > 1 and result.token_ids == reference(1, 12)
    ids = torch.tensor([PROMPTS[1].tolist() + result.token_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(engine.loaded.model(ids).logits[0].float(), dim=-1)
    start = len(PROMPTS[1]) - 1
    for i, entry in enumerate(result.logprobs):
        row = logp[start + i]
        assert entry.token == result.token_ids[i] and abs(entry.logprob - float(row[entry.token])) < 1e-4
        assert [t for t, _ in entry.top] == torch.topk(row, 3).indices.tolist()
    with pytest.raises(InvalidOptionError, match="logprobs"):
        RequestSettings(4, logprobs=21)


def test_a_request_that_fails_ends_alone_and_frees_its_slot(engine, reference, monkeypatch):
    """An error inside one request's step (here its drafter) ends that request; the others go on."""
    engine.set_tree("tr8")
    broken = LookupDrafter()
    monkeypatch.setattr(broken, "propose", lambda root: (_ for _ in ()).throw(RuntimeError("drafter broke")))
    failing = engine.submit(PROMPTS[0], RequestSettings(MAX_NEW, drafter=broken))
    healthy = engine.submit(PROMPTS[1], RequestSettings(MAX_NEW))
    results = run_all(engine, [failing, healthy])
    assert failing.state is RequestState.FAILED and str(failing.error) == "drafter broke"
    assert results[0].stop_reason == "error" and results[1].token_ids == reference(1, MAX_NEW)
    with pytest.raises(RuntimeError, match="drafter broke"):
        list(engine.run(failing))
