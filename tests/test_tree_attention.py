"""Both runners' tree attention against plain forward passes, on tiny random models of each family.

Every node of a tree must get the logits the model gives at the end of prompt + root-to-node path
when run plainly (its own masks, no cache), and after `commit` the cache must behave exactly as if
the committed tokens had been decoded one by one. The sliding-window families use windows far
smaller than the prompts, so the windowed masks are what is being tested.

Each runs on every runner the devices have: the transformers runner, the fast runner's eager
steps, and its fixed-shape steps (what a GPU replays as CUDA graphs) run eagerly on the CPU; on a
GPU the transformers runner and the fast runner with its graphs too (marked cuda: skipped here).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPT2Config, OPTConfig

from tokenrecycle.errors import UnsupportedModelError
from tokenrecycle.runners import FastRunner, HFRunner
from tokenrecycle.runners.hf import MASK_STYLE
from tokenrecycle.trees import tree_visibility
from tokenrecycle.trees.templates import TEMPLATES
from tokenrecycle.trees import compile_template, prune
from fakes import OneSequence
from tiny_models import VOCAB, build, one_thread, small_window_configs, tiny_configs, trimmed  # noqa: F401

ATOL = 1e-4

ARCHS = list(tiny_configs())


RUNNERS = {
    "hf": (HFRunner, {}),
    "fast": (FastRunner, {}),
    "fast-fixed": (FastRunner, {"fixed_steps": True}),  # the GPU's step, eager on the CPU
}
CUDA_RUNNERS = {"hf-cuda": (HFRunner, {}), "fast-cuda": (FastRunner, {})}  # the fast one with its CUDA graphs


@pytest.fixture(scope="module")
def on_cuda():
    """A CUDA copy of each model, made once (the CPU model stays the reference)."""
    copies = {}
    return lambda model: copies.setdefault(id(model), copy.deepcopy(model).to("cuda"))


@pytest.fixture(params=[*RUNNERS, *(pytest.param(name, marks=pytest.mark.cuda) for name in CUDA_RUNNERS)])
def runner_cls(request, on_cuda):
    """A runner factory: model -> runner, on the device the parameter names."""
    if request.param in RUNNERS:
        kind, options = RUNNERS[request.param]
        return lambda model: kind(model, **options)
    kind, options = CUDA_RUNNERS[request.param]
    return lambda model: kind(on_cuda(model), **options)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build(tiny_configs()[request.param])


def test_configs_exercise_sliding_windows():
    """Guard the fixtures themselves: the sliding families really mix window and full layers."""
    configs = tiny_configs()
    for name, config in configs.items():
        assert config.model_type in MASK_STYLE, name
    assert configs["qwen2"].layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert configs["qwen2"].sliding_window == 8
    assert set(configs["qwen3_sliding"].layer_types) == {"full_attention", "sliding_attention"}
    assert set(configs["gemma3"].layer_types) == {"full_attention", "sliding_attention"}
    assert configs["mistral"].sliding_window == 8


# ---------------------------------------------------------------------------------------------
# helpers


def random_tree(compiled, rng):
    tokens = rng.integers(0, VOCAB, size=len(compiled.paths))
    return prune(compiled, tokens, np.ones(len(tokens), dtype=bool))


@torch.inference_mode()
def plain_logits(model, ids) -> torch.Tensor:
    """Logits at every position of a fresh, cache-free forward with the model's own masks."""
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
    return model(input_ids=x, use_cache=False).logits[0].float()


def reference_node_logits(model, history, tree) -> torch.Tensor:
    """(len(tree), V): for each node, the last-position logits of plain history + root-to-node path.

    Computed once per leaf: causal attention makes position len(history) + d of the leaf's
    sequence equal to the last position of the depth-d prefix.
    """
    history = list(history)
    out = torch.full((len(tree), VOCAB), float("nan"))
    is_parent = np.zeros(len(tree), dtype=bool)
    is_parent[tree.parents[1:]] = True
    for leaf in np.flatnonzero(~is_parent):
        path = tree.path_to(leaf)
        logits = plain_logits(model, history + tree.tokens[path].tolist())
        out[path] = logits[len(history) :]
    assert not torch.isnan(out).any()
    return out


def assert_close(actual, expected, what):
    err = (actual.cpu() - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max |diff| {err:.3g} > {ATOL}"


# ---------------------------------------------------------------------------------------------
# one tree on top of a prefilled prompt


@pytest.mark.parametrize("template,topk", [("tr16", 8), ("tr80", 8), ("tr80", 3)])
@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_tree_logits_match_plain_forward(model, runner_cls, template, topk, prompt_len):
    rng = np.random.default_rng(prompt_len * 100 + topk)
    prompt = rng.integers(0, VOCAB, size=prompt_len)
    runner = OneSequence(runner_cls(model))
    prefill_logits = runner.prefill(prompt)
    assert prefill_logits.shape == (prompt_len, VOCAB)
    assert prefill_logits.dtype == torch.float32
    assert_close(prefill_logits, plain_logits(model, prompt), "prefill")
    assert runner.cache_length == prompt_len

    tree = random_tree(trimmed(template, topk), rng)
    logits = runner.forward_tree(tree)
    assert logits.shape == (len(tree), VOCAB)
    assert logits.dtype == torch.float32
    assert_close(logits, reference_node_logits(model, prompt, tree), f"{template}/k{topk} tree")
    # forward_tree leaves the committed length alone until commit
    assert runner.cache_length == prompt_len


def test_tree_with_repeated_tokens_and_root_only(model, runner_cls):
    """Siblings and cousins holding the same token must still see only their own ancestors."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, VOCAB, size=12)
    compiled = trimmed("tr32", 8)
    tokens = rng.integers(0, 3, size=len(compiled.paths))  # only 3 distinct tokens
    tree = prune(compiled, tokens, np.ones(len(tokens), dtype=bool))
    runner = OneSequence(runner_cls(model))
    runner.prefill(prompt)
    assert_close(runner.forward_tree(tree), reference_node_logits(model, prompt, tree), "repeated tokens")

    # a root-only tree is plain one-token decoding
    runner.prefill(prompt)
    root = prune(compiled, tokens, np.zeros(len(tokens), dtype=bool))
    assert len(root) == 1
    expected = plain_logits(model, prompt.tolist() + [int(tokens[0])])[-1:]
    assert_close(runner.forward_tree(root), expected, "root-only tree")


# ---------------------------------------------------------------------------------------------
# commit, then keep going


def _run_steps(runner_cls, model, prompt, templates, rng, choose):
    """Prefill, then for each template: forward a random tree, check it, commit choose(tree)'s path."""
    runner = OneSequence(runner_cls(model))
    runner.prefill(prompt)
    history = list(prompt)
    for step, compiled in enumerate(templates):
        tree = random_tree(compiled, rng)
        logits = runner.forward_tree(tree)
        assert_close(logits, reference_node_logits(model, history, tree), f"step {step} (cache {len(history)})")
        node = choose(tree, rng)
        path = tree.path_to(node)
        runner.commit(path)
        history += tree.tokens[path].tolist()
        assert runner.cache_length == len(history)
        if isinstance(runner, HFRunner):
            for layer in runner._cache.layers:  # white-box: nothing pending is left behind
                assert layer.keys.shape[2] == len(history)
                assert layer.values.shape[2] == len(history)
    return runner, history


def _random_node(tree, rng):
    return int(rng.integers(0, len(tree)))


def _deepest_node(tree, rng):
    deepest = np.flatnonzero(tree.depths == tree.max_depth)
    return int(deepest[-1])  # the last one: its path is not a run of leftmost nodes


@pytest.mark.parametrize("prompt_len", [2, 19])
def test_commit_random_paths_over_several_steps(model, runner_cls, prompt_len):
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, VOCAB, size=prompt_len)
    templates = [trimmed(name, 8) for name in ("tr80", "tr16", "tr48", "tr8", "tr80", "tr4", "tr32")]
    runner, history = _run_steps(runner_cls, model, prompt, templates, rng, _random_node)

    # a plain one-token step after all the commits, and the prefix logits of the whole history
    nxt = int(rng.integers(0, VOCAB))
    root_only = prune(templates[-1], np.full(len(templates[-1].paths), nxt), np.zeros(len(templates[-1].paths), bool))
    assert_close(runner.forward_tree(root_only), plain_logits(model, history + [nxt])[-1:], "final step")


def test_commit_past_the_window(model, runner_cls):
    """Commit deep paths until the committed prefix is several windows long, then keep checking.

    Prompt shorter than every window; by the end the cache holds about 5 x 7 + 3 tokens.
    """
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, VOCAB, size=3)
    compiled = trimmed("tr80", 8)
    runner, history = _run_steps(runner_cls, model, prompt, [compiled] * 5, rng, _deepest_node)
    assert len(history) == 3 + 5 * (compiled.max_depth + 1)
    window = getattr(model.config, "sliding_window", None)
    if window is not None:
        assert len(history) > 4 * window


def test_commit_root_only_paths(model, runner_cls):
    """Rejecting every draft: commit just the root each step (the cache grows by one)."""
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, VOCAB, size=9)
    _, history = _run_steps(runner_cls, model, prompt, [trimmed("tr16", 8)] * 4, rng, lambda tree, rng: 0)
    assert len(history) == 9 + 4


def test_prefill_resets_the_sequence(model, runner_cls):
    """A runner reused for a second request starts from an empty cache."""
    rng = np.random.default_rng(3)
    runner, _ = _run_steps(runner_cls, model, rng.integers(0, VOCAB, size=10), [trimmed("tr16", 8)] * 2, rng, _deepest_node)
    prompt = rng.integers(0, VOCAB, size=6)
    runner.prefill(prompt)
    assert runner.cache_length == 6
    tree = random_tree(trimmed("tr32", 8), rng)
    assert_close(runner.forward_tree(tree), reference_node_logits(model, prompt, tree), "after re-prefill")


# ---------------------------------------------------------------------------------------------
# windows no larger than the tree is deep

def test_tree_visibility_applies_window_inside_the_tree():
    """A sliding layer must not let a node see a tree ancestor `window` or more positions back."""
    compiled = compile_template([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], topk=1)  # a chain, depth 4
    tree = prune(compiled, np.arange(5), np.ones(5, dtype=bool))
    start, window = 10, 3
    visible = tree_visibility(tree, start, window)
    positions = np.arange(start + len(tree))
    node_pos = start + tree.depths
    expected = (positions[None, :] <= node_pos[:, None]) & (node_pos[:, None] - positions[None, :] < window)
    assert visible.tolist() == expected.tolist()


def test_tree_visibility_window_on_prefix():
    """Prefix keys are cut at the window; full layers see everything."""
    compiled = compile_template([(0,), (1,), (0, 0)], topk=2)
    tree = prune(compiled, np.arange(4), np.ones(4, dtype=bool))
    start = 6
    full = tree_visibility(tree, start, None)
    assert full[:, :start].all()
    assert full[:, start:].tolist() == tree.ancestor_mask.tolist()
    windowed = tree_visibility(tree, start, 3)
    # node at depth d sits at position 6 + d and sees prefix positions > 6 + d - 3
    for node, depth in enumerate(tree.depths):
        assert windowed[node, :start].tolist() == [q > start + depth - 3 for q in range(start)]
    assert windowed[:, start:].tolist() == tree.ancestor_mask.tolist()  # depth 2 < window 3


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_tree_shallower_than_window_edge(family, runner_cls):
    """Window 7 = tree depth 6 + 1: the deepest node still sees the root, nothing more is cut."""
    model = build(small_window_configs(7)[family])
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, size=15)
    runner = OneSequence(runner_cls(model))
    runner.prefill(prompt)
    tree = random_tree(trimmed("tr80", 8), rng)
    assert_close(runner.forward_tree(tree), reference_node_logits(model, prompt, tree), "window 7")


@pytest.mark.parametrize("window", [2, 4, 6])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_tree_deeper_than_window_matches_plain_forward(family, window, runner_cls):
    """Sliding window no larger than the tree depth (tr80 has depth 6)."""
    model = build(small_window_configs(window)[family])
    rng = np.random.default_rng(window)
    prompt = rng.integers(0, VOCAB, size=15)
    runner = OneSequence(runner_cls(model))
    runner.prefill(prompt)
    tree = random_tree(trimmed("tr80", 8), rng)
    assert_close(runner.forward_tree(tree), reference_node_logits(model, prompt, tree), f"window {window}")


# ---------------------------------------------------------------------------------------------
# unsupported families are refused


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
        OPTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=128, vocab_size=128,
                  max_position_embeddings=64, word_embed_proj_dim=64),
    ],
    ids=["gpt2", "opt"],
)
@pytest.mark.parametrize("runner_cls", [HFRunner, FastRunner], ids=["hf", "fast"])
def test_unsupported_architecture_is_refused(config, runner_cls):
    model = build(config)
    with pytest.raises(UnsupportedModelError, match=config.model_type):
        runner_cls(model)
