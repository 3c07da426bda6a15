"""forward_batch: the trees of several slots in one pass give each slot what it gets alone.

The fast runner runs the linear layers on every node of every tree at once and attention per slot
on that slot's own cache; its linears give a row the same result whatever the number of rows, so
a batched pass must equal per-slot passes bit for bit, in both decoder loops. Prompts fed in chunks
(begin, then chain trees) are checked against a one-call prefill, and the base class's default
forward_batch (a loop over forward_tree, used by the transformers runner) against forward_tree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenrecycle.runners import FastRunner, HFRunner, Loop
from tokenrecycle.trees import chain_tree, prune
from tiny_models import VOCAB, build, one_thread, tiny_configs, trimmed  # noqa: F401

TEMPLATES = [trimmed(name) for name in ("tr4", "tr16", "tr48")]  # 5, 17 and 49 nodes
PROMPT_LENGTHS = (3, 12, 21)  # one under the tiny models' sliding windows (7-8), two over them

CASES = [(family, torch.float32, None) for family in tiny_configs()] + [
    ("llama", torch.bfloat16, None), ("gemma3", torch.bfloat16, None), ("llama", torch.bfloat16, "int4"),
]  # fmt: skip
LOOPS = {"python": False, "cpp": None}


def random_tree(compiled, rng):
    tokens = rng.integers(0, VOCAB, size=len(compiled.paths))
    return prune(compiled, tokens, np.ones(len(tokens), dtype=bool))


def committed(runner, slot) -> tuple[torch.Tensor, torch.Tensor]:
    cache = runner._caches[slot]
    return cache.keys[:, :, : cache.length], cache.values[:, :, : cache.length]


def caches_equal(a, b, slot) -> bool:
    return all(torch.equal(x, y) for x, y in zip(committed(a, slot), committed(b, slot)))


def runner_pair(model, loop: str, quantize=None, slots: int = 3):
    """Two runners over one model with every slot allocated: one batches, the other runs alone."""
    batched, alone = (FastRunner(model, quantize=quantize, native=LOOPS[loop], max_slots=slots) for _ in range(2))
    for runner in (batched, alone):
        assert [runner.allocate() for _ in range(slots)] == list(range(slots))
    assert batched.loop == alone.loop == (Loop.PYTHON if loop == "python" else Loop.CPP)
    return batched, alone


# ---------------------------------------------------------------------------------------------
# one batched pass equals each slot alone, bit for bit


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("family, dtype, quantize", CASES)
def test_a_batched_pass_equals_each_slot_alone_bit_for_bit(family, dtype, quantize, loop):
    # bfloat16 and int4 too: the linears are row-independent there as well, and attention runs in
    # float32 on the CPU, so no tolerance is needed in any case.
    model = build(tiny_configs()[family]).to(dtype)
    batched, alone = runner_pair(model, loop, quantize)
    rng = np.random.default_rng(0)
    for slot, length in enumerate(PROMPT_LENGTHS):
        prompt = rng.integers(0, VOCAB, size=length)
        assert torch.equal(batched.prefill(slot, prompt, reserve=0), alone.prefill(slot, prompt, reserve=0))
    for step in range(4):
        # every slot, or two of them, in any order, each with a tree of its own size
        slots = rng.permutation(3)[: 3 if step % 2 == 0 else 2].tolist()
        trees = [random_tree(TEMPLATES[i], rng) for i in rng.permutation(3)[: len(slots)]]
        outputs = batched.forward_batch(list(zip(slots, trees)))
        assert len(outputs) == len(slots)
        for slot, tree, logits in zip(slots, trees, outputs):
            assert logits.shape == (len(tree), VOCAB) and logits.dtype == torch.float32
            assert torch.equal(logits, alone.forward_tree(slot, tree)), f"step {step}, slot {slot}"
            path = tree.path_to(int(rng.integers(len(tree))))  # any acceptance, not only the model's
            batched.commit(slot, path), alone.commit(slot, path)
    for slot in range(3):
        assert batched.cache_length(slot) == alone.cache_length(slot) > PROMPT_LENGTHS[slot]
        assert caches_equal(batched, alone, slot), f"slot {slot}"


def test_a_batch_of_one_is_forward_tree(one_thread):
    model = build(tiny_configs()["gemma3"])
    batched, alone = runner_pair(model, "cpp", slots=1)
    prompt = np.arange(1, 15)
    batched.prefill(0, prompt), alone.prefill(0, prompt)
    tree = random_tree(TEMPLATES[1], np.random.default_rng(3))
    [logits] = batched.forward_batch([(0, tree)])
    assert torch.equal(logits, alone.forward_tree(0, tree))


# ---------------------------------------------------------------------------------------------
# what a batch may hold


def test_a_slot_appears_at_most_once_and_must_be_allocated(one_thread):
    model = build(tiny_configs()["llama"])
    runner = FastRunner(model, max_slots=3)
    first, second = runner.allocate(), runner.allocate()  # slot 2 stays free
    for slot in (first, second):
        runner.prefill(slot, np.arange(1, 6))
    tree = random_tree(TEMPLATES[0], np.random.default_rng(1))
    with pytest.raises(ValueError, match="at most once"):
        runner.forward_batch([(first, tree), (second, tree), (first, tree)])
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        runner.forward_batch([(first, tree), (2, tree)])
    with pytest.raises(ValueError, match="slot 7 is not allocated"):
        runner.forward_batch([(7, tree)])
    runner.release(second)
    with pytest.raises(ValueError, match=f"slot {second} is not allocated"):
        runner.forward_batch([(second, tree)])
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        runner.begin(2, 10)
    # nothing was committed by the refused batches, and the runner still works
    assert runner.cache_length(first) == 5
    [logits] = runner.forward_batch([(first, tree)])
    assert logits.shape == (len(tree), VOCAB)


# ---------------------------------------------------------------------------------------------
# a prompt fed in chunks beside another slot's decoding


CHUNKINGS = [[9, 20], [5, 11, 23], [1, 2, 23]]  # chunk ends: the last is the prompt's length


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("family", tiny_configs())
def test_a_prompt_in_chunks_beside_a_decoding_slot(family, loop):
    """Chunks run as chain trees on an emptied slot, each batched with the other slot's tree.

    Against feeding the same chunks alone the result is exact (batch invariance). Against a prefill
    of the whole prompt in one call it is not: the chunks' attention calls have other shapes (an
    additive mask over the cached keys instead of plain causal attention on an empty cache), which
    sums in another order. Measured (two seeds, every family, both loops): logits within 4e-7,
    cached keys/values within 2.3e-6 (gemma3; 1e-7 to 1.2e-6 for the others); asserted with
    atol=rtol=1e-5.
    """
    model = build(tiny_configs()[family])
    batched, alone = runner_pair(model, loop, slots=2)
    whole = FastRunner(model, native=LOOPS[loop], max_slots=1)
    whole.allocate()
    rng = np.random.default_rng(4)
    prompting, decoding = 0, 1
    for ends in CHUNKINGS:
        prompt = rng.integers(0, VOCAB, size=ends[-1])
        other = rng.integers(0, VOCAB, size=10)
        batched.prefill(decoding, other), alone.prefill(decoding, other)
        batched.begin(prompting, len(prompt)), alone.begin(prompting, len(prompt))
        assert batched.cache_length(prompting) == 0
        chunks = []
        for low, high in zip([0] + ends, ends):
            chunk, tree = chain_tree(prompt[low:high]), random_tree(TEMPLATES[1], rng)
            decoded, fed = batched.forward_batch([(decoding, tree), (prompting, chunk)])
            assert torch.equal(decoded, alone.forward_tree(decoding, tree))
            assert torch.equal(fed, alone.forward_tree(prompting, chunk))
            path = tree.path_to(int(rng.integers(len(tree))))
            for runner in (batched, alone):
                runner.commit(prompting, np.arange(high - low))
                runner.commit(decoding, path)
            chunks.append(fed)
            assert batched.cache_length(prompting) == high
        assert caches_equal(batched, alone, prompting) and caches_equal(batched, alone, decoding)

        expected = whole.prefill(0, prompt)
        torch.testing.assert_close(chunks[-1], expected[ends[-2] :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(chunks), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(committed(batched, prompting), committed(whole, 0), atol=1e-5, rtol=1e-5)
        # and decoding goes on from the chunked prompt as from the whole one
        tree = random_tree(TEMPLATES[2], rng)
        [after] = batched.forward_batch([(prompting, tree)])
        torch.testing.assert_close(after, whole.forward_tree(0, tree), atol=1e-5, rtol=1e-5)
        for runner in (batched, alone):
            runner.commit(prompting, np.array([0]))


def test_a_chunked_prompt_grows_a_slot_sized_too_small(one_thread):
    """begin() sizes the cache once; chunks past that size grow it, keeping what is committed."""
    model = build(tiny_configs()["mistral"])
    batched, alone = runner_pair(model, "cpp", slots=2)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, VOCAB, size=300)
    other = rng.integers(0, VOCAB, size=6)
    batched.prefill(1, other), alone.prefill(1, other)
    batched.begin(0, 4), alone.begin(0, 4)  # room for far fewer tokens than will come
    capacity = batched._caches[0].capacity
    assert capacity < len(prompt)
    for low, high in ((0, 200), (200, 300)):
        tree = random_tree(TEMPLATES[0], rng)
        fed, decoded = batched.forward_batch([(0, chain_tree(prompt[low:high])), (1, tree)])
        assert torch.equal(fed, alone.forward_tree(0, chain_tree(prompt[low:high])))
        assert torch.equal(decoded, alone.forward_tree(1, tree))
        for runner in (batched, alone):
            runner.commit(0, np.arange(high - low)), runner.commit(1, np.array([0]))
    assert batched._caches[0].capacity > capacity and batched.cache_length(0) == 300
    assert caches_equal(batched, alone, 0) and caches_equal(batched, alone, 1)


# ---------------------------------------------------------------------------------------------
# the base class's default: forward_tree for each slot in turn


def test_the_transformers_runner_batches_by_running_each_slot_in_turn(one_thread):
    model = build(tiny_configs()["qwen2"])
    batched, alone = HFRunner(model, max_slots=2), HFRunner(model, max_slots=2)
    assert not batched.batches and FastRunner(model).batches
    rng = np.random.default_rng(6)
    for runner in (batched, alone):
        assert [runner.allocate(), runner.allocate()] == [0, 1]
    for slot, length in enumerate((4, 13)):
        prompt = rng.integers(0, VOCAB, size=length)
        batched.prefill(slot, prompt), alone.prefill(slot, prompt)
    with pytest.raises(NotImplementedError, match="one call"):
        batched.begin(0, 10)
    for _ in range(3):
        trees = [random_tree(TEMPLATES[1], rng), random_tree(TEMPLATES[2], rng)]
        outputs = batched.forward_batch([(1, trees[1]), (0, trees[0])])
        # The default is a loop over forward_tree: the same calls, so the same bits (the HF tests'
        # tolerance, 1e-4, is not needed here).
        assert torch.equal(outputs[0], alone.forward_tree(1, trees[1]))
        assert torch.equal(outputs[1], alone.forward_tree(0, trees[0]))
        for slot, tree in enumerate(trees):
            path = tree.path_to(int(rng.integers(len(tree))))
            batched.commit(slot, path), alone.commit(slot, path)
    for slot in (0, 1):
        assert batched.cache_length(slot) == alone.cache_length(slot)
        for mine, theirs in zip(batched._caches[slot].layers, alone._caches[slot].layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
