"""The fast runner's cache, its choice against the transformers runner, and the dtype chooser.

Tree logits of both runners against plain forward passes are in test_tree_attention.py; greedy
exactness of both runners on tiny models in test_lossless_tiny.py and on real models in the
test_lossless_* files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Gemma3TextConfig, LlamaConfig

from tokenrecycle.errors import InvalidOptionError, UnsupportedModelError
from tokenrecycle.hardware import auto_dtype, cpu_flags
from tokenrecycle.runners import FastRunner, HFRunner, Loop, make_runner
from tokenrecycle.runners.kv_cache import MIN_CAPACITY, KVCache
from tokenrecycle.runners import fast
from tokenrecycle.runners.linear import INT4_GROUP, int4_linear
from tokenrecycle.runners.native import native_module
from tokenrecycle.trees import chain_tree, limit_depth, prune
from fakes import OneSequence
from tiny_models import COMMON, VOCAB, build, one_thread, tiny_configs, trimmed  # noqa: F401

CONTEXT = 48  # a context limit the property test runs into
TEMPLATES = [trimmed(name) for name in ("tr4", "tr16", "tr48", "tr80")]


def near_limit_configs():
    common = {**COMMON, "max_position_embeddings": CONTEXT}
    return {
        "llama": LlamaConfig(num_hidden_layers=2, **common),
        "gemma3": Gemma3TextConfig(
            num_hidden_layers=2,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            **common,
        ),
    }


MODELS = {name: build(config) for name, config in near_limit_configs().items()}


def committed_cache(runner: OneSequence) -> tuple[torch.Tensor, torch.Tensor]:
    return slot_cache(runner.runner, runner.slot)


def slot_cache(runner: FastRunner, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    length, cache = runner.cache_length(slot), runner._caches[slot]
    return cache.keys[:, :, :length].clone(), cache.values[:, :, :length].clone()


# ---------------------------------------------------------------------------------------------
# after any steps, the cache is the cache of plain decoding of the accepted tokens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(sorted(MODELS)),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=CONTEXT - 2),
    steps=st.lists(
        st.tuples(st.integers(0, len(TEMPLATES) - 1), st.integers(0, 2**31 - 1), st.integers(0, 10_000)),
        min_size=1,
        max_size=8,
    ),
)
def test_cache_equals_plain_decoding_of_accepted_tokens(one_thread, family, prompt, steps):
    model = MODELS[family]
    runner = OneSequence(FastRunner(model))
    runner.prefill(np.asarray(prompt), reserve=0)  # reserve 0: later steps must grow the cache
    history = list(prompt)
    for template_index, seed, pick in steps:
        room = runner.max_context - runner.cache_length - 1
        if room < 0:
            break
        compiled = TEMPLATES[template_index]
        tokens = np.random.default_rng(seed).integers(0, VOCAB, size=len(compiled.paths))
        tree = limit_depth(prune(compiled, tokens, np.ones(len(tokens), dtype=bool)), room)
        runner.forward_tree(tree)
        path = tree.path_to(pick % len(tree))  # any acceptance pattern, not only the model's
        runner.commit(path)
        history += tree.tokens[path].tolist()
        assert runner.cache_length == len(history) <= runner.max_context

    reference = OneSequence(FastRunner(model))
    reference.prefill(np.asarray(history))
    keys, values = committed_cache(runner)
    expected_keys, expected_values = committed_cache(reference)
    torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=1e-5)
    if runner.cache_length < runner.max_context:
        nxt = chain_tree([history[-1] % 7])
        torch.testing.assert_close(runner.forward_tree(nxt), reference.forward_tree(nxt), atol=1e-4, rtol=1e-4)


def slot_steps(slots: int):
    """Per step, each slot's (template, tree seed, accepted node) or None: that slot sits the step out."""
    step = st.one_of(
        st.none(),
        st.tuples(st.integers(0, len(TEMPLATES) - 1), st.integers(0, 2**31 - 1), st.integers(0, 10_000)),
    )
    return st.lists(st.lists(step, min_size=slots, max_size=slots), min_size=1, max_size=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(sorted(MODELS)),
    prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=CONTEXT - 2), min_size=2, max_size=3),
    data=st.data(),
)
def test_batched_steps_leave_every_slot_the_cache_of_plain_decoding(one_thread, family, prompts, data):
    """Several slots stepped together through forward_batch, each with its own random trees and
    acceptance: every slot ends with the cache of plain decoding of its own accepted tokens."""
    model = MODELS[family]
    runner = FastRunner(model, max_slots=len(prompts))
    slots = [runner.allocate() for _ in prompts]
    histories = [list(prompt) for prompt in prompts]
    for slot, prompt in zip(slots, prompts):
        runner.prefill(slot, np.asarray(prompt), reserve=0)
    for step in data.draw(slot_steps(len(slots)), label="steps"):
        items, picks = [], []
        for slot, choice in zip(slots, step):
            room = runner.max_context - runner.cache_length(slot) - 1
            if choice is None or room < 0:
                continue
            template_index, seed, pick = choice
            compiled = TEMPLATES[template_index]
            tokens = np.random.default_rng(seed).integers(0, VOCAB, size=len(compiled.paths))
            items.append((slot, limit_depth(prune(compiled, tokens, np.ones(len(tokens), dtype=bool)), room)))
            picks.append(pick)
        if not items:
            continue
        for (slot, tree), logits, pick in zip(items, runner.forward_batch(items), picks):
            assert logits.shape == (len(tree), VOCAB)
            path = tree.path_to(pick % len(tree))
            runner.commit(slot, path)
            histories[slot] += tree.tokens[path].tolist()
            assert runner.cache_length(slot) == len(histories[slot]) <= runner.max_context

    next_items = []
    for slot, history in zip(slots, histories):
        reference = OneSequence(FastRunner(model))
        reference.prefill(np.asarray(history))
        torch.testing.assert_close(slot_cache(runner, slot), committed_cache(reference), atol=1e-5, rtol=1e-5)
        room = runner.max_context - len(history) - 1
        if room >= 0:  # the next tree, batched, against the plain-decoding cache alone
            compiled = TEMPLATES[1]
            tokens = np.random.default_rng(len(history)).integers(0, VOCAB, size=len(compiled.paths))
            tree = limit_depth(prune(compiled, tokens, np.ones(len(tokens), dtype=bool)), room)
            next_items.append((slot, tree, reference.forward_tree(tree)))
    if next_items:
        outputs = runner.forward_batch([(slot, tree) for slot, tree, _ in next_items])
        for (slot, _, expected), logits in zip(next_items, outputs):
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_cache_grows_past_its_first_allocation_keeping_committed_rows(one_thread):
    model = build(LlamaConfig(num_hidden_layers=1, **COMMON))
    runner = OneSequence(FastRunner(model))
    runner.prefill(np.arange(5), reserve=0)
    first_capacity = runner.runner._caches[runner.slot].capacity
    history = list(range(5))
    while runner.cache_length < first_capacity + 20:
        tree = chain_tree([history[-1], 1, 2, 3])
        runner.forward_tree(tree)
        runner.commit(np.array([0, 1, 2]))
        history += [history[-1], 1, 2]
    assert runner.runner._caches[runner.slot].capacity > first_capacity
    reference = OneSequence(FastRunner(model))
    reference.prefill(np.asarray(history))
    torch.testing.assert_close(committed_cache(runner), committed_cache(reference), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# KVCache on its own


def test_kv_cache_commit_gathers_a_branching_path_in_place():
    cache = KVCache(layers=2, kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"))
    cache.reset(8)
    assert cache.capacity == MIN_CAPACITY
    for layer in range(2):
        cache.write(layer, 0, torch.tensor([[[10.0], [11.0]]]), torch.tensor([[[20.0], [21.0]]]))
    cache.length = 2
    pending = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    for layer in range(2):
        cache.write(layer, 2, pending, -pending)
    cache.commit(np.array([0, 2, 3]))  # root, then a path that skips node 1
    assert cache.length == 5
    keys, values = cache.view(1, 0, 5)
    assert keys.flatten().tolist() == [10, 11, 0, 2, 3]
    assert values.flatten().tolist() == [20, 21, 0, -2, -3]


def test_kv_cache_reserve_keeps_committed_rows_and_reset_empties():
    cache = KVCache(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    cache.reset(1)
    rows = torch.arange(6, dtype=torch.float32).view(1, 3, 2)
    cache.write(0, 0, rows, rows + 100)
    cache.length = 3
    cache.reserve(MIN_CAPACITY + 1)
    assert cache.capacity >= MIN_CAPACITY + 1
    keys, values = cache.view(0, 0, 3)
    assert keys[0].tolist() == rows.tolist() and values[0].tolist() == (rows + 100).tolist()
    cache.reset(4)
    assert cache.length == 0 and cache.capacity >= MIN_CAPACITY + 1  # no shrinking, no reallocation


# ---------------------------------------------------------------------------------------------
# which runner runs a model


def test_auto_picks_fast_and_hf_is_available(one_thread):
    model = build(LlamaConfig(num_hidden_layers=1, **COMMON))
    assert isinstance(make_runner(model), FastRunner)
    assert isinstance(make_runner(model, "fast"), FastRunner)
    assert isinstance(make_runner(model, "hf"), HFRunner)
    with pytest.raises(InvalidOptionError, match="runner must be one of"):
        make_runner(model, "turbo")


def test_length_dependent_rope_falls_back_to_hf_or_is_refused(one_thread):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = build(LlamaConfig(num_hidden_layers=1, rope_parameters=rope, **COMMON))
    assert isinstance(make_runner(model, "auto"), HFRunner)
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        make_runner(model, "fast")


# ---------------------------------------------------------------------------------------------
# dtype for the machine


def test_auto_dtype_follows_the_cpu_flags():
    assert auto_dtype(flags={"avx2", "avx512_bf16"}).dtype == "bfloat16"
    assert auto_dtype(flags={"avx2", "amx_bf16"}).dtype == "bfloat16"
    plain = auto_dtype(flags={"avx2", "fma"})
    assert plain.dtype == "float32" and "no bfloat16" in plain.reason


def test_cpu_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512f avx512_bf16\n"
    assert cpu_flags(text) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags("") == set()


# ---------------------------------------------------------------------------------------------
# int4 weights


def grid_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A bf16 weight already on a 4-bit grid per group of 32, so int4 must reproduce it exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid: min-max finds the same scale
    scale = torch.tensor([0.5, 0.25, 0.125, 0.0625])[torch.randint(0, 4, (rows, cols // INT4_GROUP, 1), generator=g)]
    low = torch.randint(-8, 0, (rows, cols // INT4_GROUP, 1), generator=g).float() * 0.25
    return (q * scale + low).view(rows, cols).bfloat16()


def test_int4_linear_reproduces_a_weight_on_its_grid():
    weight = grid_weight(48, 64)
    bias = torch.randn(48).bfloat16()
    x = torch.randn(5, 64).bfloat16()
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(int4_linear(weight, bias)(x).float(), expected, atol=0.05, rtol=0.02)


def test_int4_linear_error_is_bounded_by_half_a_step():
    weight = torch.randn(32, 64).bfloat16()
    eye = torch.eye(64).bfloat16()
    dequantised = int4_linear(weight)(eye).float().t()  # x = I gives back the weights
    step = weight.float().view(32, 2, 32).amax(-1) - weight.float().view(32, 2, 32).amin(-1)
    error = (dequantised - weight.float()).abs().view(32, 2, 32).amax(-1)
    assert (error <= step / 30 + 0.02).all()  # half a step of (max - min) / 15, plus bf16 rounding


def test_int4_needs_bfloat16_and_the_fast_runner(one_thread):
    model = build(LlamaConfig(num_hidden_layers=1, **COMMON))
    with pytest.raises(InvalidOptionError, match="bfloat16"):
        FastRunner(model, quantize="int4")  # a float32 model
    with pytest.raises(InvalidOptionError, match="fast runner"):
        make_runner(model.to(torch.bfloat16), "hf", quantize="int4")
    with pytest.raises(InvalidOptionError, match="quantize"):
        FastRunner(model, quantize="int3")


def test_int4_tree_logits_match_its_own_sequential_logits(one_thread):
    """Tree attention is independent of the weights' format: each node of a tree gets the logits of
    its root-to-node path run one token at a time on the same int4 runner (bf16 tolerance)."""
    model = build(LlamaConfig(num_hidden_layers=2, **COMMON)).to(torch.bfloat16)
    runner = OneSequence(FastRunner(model, quantize="int4"))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, size=9)
    compiled = trimmed("tr16")
    tree = prune(compiled, rng.integers(0, VOCAB, size=len(compiled.paths)), np.ones(len(compiled.paths), bool))
    runner.prefill(prompt)
    tree_logits = runner.forward_tree(tree)
    for node in range(len(tree)):
        path = tree.path_to(node)
        runner.prefill(np.concatenate([prompt, tree.tokens[path[:-1]]]))
        step = runner.forward_tree(chain_tree([tree.tokens[node]]))
        torch.testing.assert_close(tree_logits[node], step[0], atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# the C++ decoder loop runs the Python loop's operations: bit-identical results


LOOP_CASES = [(family, torch.float32, None) for family in tiny_configs()] + [
    ("llama", torch.bfloat16, None), ("gemma3", torch.bfloat16, None), ("llama", torch.bfloat16, "int4"),
]  # fmt: skip


@pytest.mark.parametrize("family, dtype, quantize", LOOP_CASES)
def test_the_cpp_loop_equals_the_python_loop_bit_for_bit(one_thread, family, dtype, quantize):
    assert not isinstance(native_module(), str), native_module()  # a build this machine can make
    assert_the_loops_agree_bit_for_bit(build(tiny_configs()[family]).to(dtype), quantize)


def assert_the_loops_agree_bit_for_bit(model, quantize: str | None, steps: int = 3) -> FastRunner:
    """The C++ and the Python loop on the same weights: the same logits for a prefill and random
    trees, the same committed cache. Returns the C++ loop's runner."""
    native, python = OneSequence(FastRunner(model, quantize=quantize)), OneSequence(FastRunner(model, quantize=quantize, native=False))
    assert (native.loop, python.loop) == (Loop.CPP, Loop.PYTHON)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, size=20)  # longer than the sliding windows
    compiled = trimmed("tr16")
    assert torch.equal(native.prefill(prompt), python.prefill(prompt))
    for _ in range(steps):
        tree = prune(compiled, rng.integers(0, VOCAB, size=len(compiled.paths)), np.ones(len(compiled.paths), bool))
        assert torch.equal(native.forward_tree(tree), python.forward_tree(tree))
        path = tree.path_to(int(rng.integers(len(tree))))
        native.commit(path), python.commit(path)
    assert all(torch.equal(a, b) for a, b in zip(committed_cache(native), committed_cache(python)))
    return native.runner


def test_without_a_build_the_python_loop_runs_and_says_why(one_thread, monkeypatch):
    model = MODELS["llama"]
    monkeypatch.setattr(fast, "native_module", lambda: "the C++ loop could not be built (no compiler)")
    runner = OneSequence(FastRunner(model))
    assert runner.loop == Loop.PYTHON and runner.loop_note == "the C++ loop could not be built (no compiler)"
    monkeypatch.undo()
    monkeypatch.setenv("TOKENRECYCLE_NATIVE", "0")
    assert FastRunner(model).loop == Loop.PYTHON and FastRunner(model, native=True).loop == Loop.CPP
    prompt = np.arange(1, 9)
    torch.testing.assert_close(runner.prefill(prompt), OneSequence(FastRunner(model)).prefill(prompt), atol=0, rtol=0)


def test_the_builder_finds_the_ninja_this_python_installed(monkeypatch):
    import ninja

    from tokenrecycle.runners.native import put_ninja_on_path

    monkeypatch.setenv("PATH", "/nowhere")
    put_ninja_on_path()
    put_ninja_on_path()  # once is enough
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernels_compute_what_torchs_operations_do(dtype):
    """The residual add and the rotary embedding with its cache writes give torch's bits; the norm
    (a sum in another order) agrees within one rounding of the dtype."""
    module = native_module()
    assert not isinstance(module, str), module
    gen = torch.Generator().manual_seed(0)
    x, h = (torch.randn(5, 96, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(dtype)
    total, normed = module.add_rms_norm(x, h, weight.float(), 1e-6, False)
    assert torch.equal(total, x + h)
    expected = weight * torch.rms_norm((x + h).float(), (96,), eps=1e-6).to(dtype)
    torch.testing.assert_close(normed, expected, atol=0, rtol=torch.finfo(dtype).eps * 2)
    heads, kv_heads, d, sizes, starts = 4, 2, 16, [3, 2], [0, 7]
    qkv = torch.randn(5, heads + 2 * kv_heads, d, generator=gen).to(dtype)
    cos, sin = (torch.randn(5, 1, d, generator=gen).to(dtype) for _ in range(2))
    caches = [(torch.zeros(3, kv_heads, 12, d), torch.zeros(3, kv_heads, 12, d)) for _ in sizes]
    queries = module.rotate_into_cache(qkv, cos, sin, heads, [k for k, _ in caches], [v for _, v in caches], starts, sizes, 1)
    rotated = qkv * cos + qkv.roll(d // 2, dims=-1) * sin
    assert torch.equal(queries, rotated[:, :heads].float())
    row = 0
    for (keys, values), start, size in zip(caches, starts, sizes):
        rows = slice(row, row + size)
        assert torch.equal(keys[1, :, start : start + size], rotated[rows, heads : heads + kv_heads].transpose(0, 1).float())
        assert torch.equal(values[1, :, start : start + size], qkv[rows, heads + kv_heads :].transpose(0, 1).float())
        assert not keys[0].any() and not keys[2].any()  # other layers untouched
        row += size
