"""Lossless end to end on tiny random models: speculative_decode gives exactly model.generate's tokens.

Both runners, every supported family, every shipped template (topk 8), a few prompts (one token, a repeated
pattern, random ids), twice over on the same drafter so the second pass drafts from a hot table
and trees are really accepted, not only rejected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes import decode_alone
from tokenrecycle.drafters import PlainDrafter, TokenRecyclingDrafter
from tokenrecycle.trees.choice import resolve_tree
from tokenrecycle.runners import FastRunner, HFRunner
from tokenrecycle.trees.templates import TEMPLATES
from tiny_models import VOCAB, build, one_thread, small_window_configs, tiny_configs, trimmed  # noqa: F401

TOPK = 8
N = 32

ARCHS = list(tiny_configs())

PROMPTS = {
    "one_token": [17],
    "repetitive": [3, 41, 97, 200, 5] * 5,
    "random": np.random.default_rng(0).integers(0, VOCAB, size=21).tolist(),
}


@pytest.fixture(params=[HFRunner, FastRunner], ids=["hf", "fast"])
def runner_cls(request):
    return request.param


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, one_thread):
    """(name, model, {prompt name: greedy reference of N new tokens})."""
    model = build(tiny_configs()[request.param])
    assert model.generation_config.eos_token_id is None
    refs = {}
    for name, prompt in PROMPTS.items():
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=N, attention_mask=torch.ones_like(ids), pad_token_id=0
            )
        refs[name] = out[0, len(prompt) :].tolist()
        assert len(refs[name]) == N  # nothing stopped generate early
    return request.param, model, refs


def run(runner, drafter, prompt, max_new_tokens):
    """All yields of one speculative generation, each checked to be a non-empty list of ints."""
    steps = [s.tokens for s in decode_alone(runner, drafter, np.asarray(prompt, dtype=np.int64), max_new_tokens)]
    for step in steps:
        assert isinstance(step, list) and step and all(isinstance(t, int) for t in step)
    assert len(steps[0]) == 1  # the prefill decides one token
    total = sum(len(s) for s in steps)
    assert total <= max_new_tokens
    return steps


def flat(steps):
    return [t for step in steps for t in step]


def mean_per_tree_step(steps):
    """Tokens decided per forward_tree pass (the prefill excluded); 1.0 means nothing accepted."""
    tree_steps = steps[1:]
    return sum(len(s) for s in tree_steps) / len(tree_steps) if tree_steps else 0.0


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", list(TEMPLATES) + ["dyn8", "dyn48"])
def test_speculative_equals_generate(arch, template, runner_cls):
    name, model, refs = arch
    choice = resolve_tree(template, TOPK)
    compiled = choice.template
    runner = runner_cls(model)  # one runner and one drafter for every request below
    drafter = TokenRecyclingDrafter(VOCAB, compiled, topk=TOPK, hot_start=True, budget=choice.budget)
    for pass_ in ("cold", "hot"):
        for prompt_name, prompt in PROMPTS.items():
            steps = run(runner, drafter, prompt, N)
            assert flat(steps) == refs[prompt_name], f"{name}/{template}/{prompt_name} ({pass_} table)"
            if template == "none":
                assert all(len(s) == 1 for s in steps)  # no draft: plain decoding, one token a pass
            else:
                assert all(len(s) <= compiled.max_depth + 1 for s in steps)


def test_plain_drafter_is_plain_decoding(arch, runner_cls):
    """No drafts: one token per forward pass, exactly model.generate's tokens, on either runner."""
    name, model, refs = arch
    runner = runner_cls(model)
    for prompt_name, prompt in PROMPTS.items():
        steps = run(runner, PlainDrafter(), prompt, N)
        assert all(len(s) == 1 for s in steps)
        assert flat(steps) == refs[prompt_name], f"{name}/{prompt_name}"


def test_hot_start_accepts_drafts(arch, runner_cls):
    """On the second pass over the same prompts, a hot table drafts what the model says."""
    name, model, refs = arch
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr80"), topk=TOPK, hot_start=True)
    for prompt in PROMPTS.values():
        run(runner, drafter, prompt, N)
    hot = {}
    for prompt_name, prompt in PROMPTS.items():
        steps = run(runner, drafter, prompt, N)
        assert flat(steps) == refs[prompt_name]
        hot[prompt_name] = mean_per_tree_step(steps)
    assert min(hot.values()) > 1.0, f"{name}: some prompt had no draft accepted on a hot table: {hot}"


def test_some_family_accepts_long_drafts(runner_cls):
    """Trees are accepted, not just rejected: somewhere mean tokens per pass is well above 1."""
    best = {}
    for name, config in tiny_configs().items():
        model = build(config)
        runner = runner_cls(model)
        drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr80"), topk=TOPK)
        prompt = PROMPTS["repetitive"]
        run(runner, drafter, prompt, N)
        best[name] = mean_per_tree_step(run(runner, drafter, prompt, N))
    assert max(best.values()) > 2.0, best
    assert sum(v > 1.0 for v in best.values()) >= 3, best


def test_cold_table_without_hot_start(arch, runner_cls):
    """hot_start=False empties the table per request; output is still exactly greedy."""
    name, model, refs = arch
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr32"), topk=TOPK, hot_start=False)
    for _ in range(2):
        for prompt_name, prompt in PROMPTS.items():
            assert flat(run(runner, drafter, prompt, N)) == refs[prompt_name], f"{name}/{prompt_name}"


# ---------------------------------------------------------------------------------------------
# max_new_tokens is a hard limit, also when a hot table would accept deeper


def test_max_new_tokens_one(arch, runner_cls):
    name, model, refs = arch
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr80"), topk=TOPK)
    for prompt_name, prompt in PROMPTS.items():
        run(runner, drafter, prompt, N)  # warm the table
        steps = run(runner, drafter, prompt, 1)
        assert steps == [[refs[prompt_name][0]]]


@pytest.mark.parametrize("template", ["tr4", "tr80"])
def test_short_budgets_are_exact(arch, template, runner_cls):
    """Every budget 1..10 gives exactly that many tokens, the greedy prefix, on a hot table."""
    name, model, refs = arch
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed(template), topk=TOPK)
    filled_by_a_draft = 0  # runs whose last pass accepted drafts right up to the budget
    for prompt_name, prompt in PROMPTS.items():
        run(runner, drafter, prompt, N)  # warm the table on the very continuation
        for budget in range(1, 11):
            steps = run(runner, drafter, prompt, budget)
            got = flat(steps)
            assert len(got) == budget, f"{name}/{template}/{prompt_name}: {len(got)} tokens for budget {budget}"
            assert got == refs[prompt_name][:budget]
            filled_by_a_draft += len(steps) > 1 and len(steps[-1]) > 1
    assert filled_by_a_draft > 0  # the depth cut near the budget was really exercised


def test_closing_early_then_reusing_runner(arch, runner_cls):
    """A caller may stop after a few yields (EOS, stop string); the next request is unaffected."""
    name, model, refs = arch
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr48"), topk=TOPK)
    gen = decode_alone(runner, drafter, np.asarray(PROMPTS["repetitive"]), N)
    next(gen)
    next(gen)
    gen.close()
    assert flat(run(runner, drafter, PROMPTS["random"], N)) == refs["random"]


# ---------------------------------------------------------------------------------------------
# sliding windows no larger than the tree is deep (tr80: depth 6)


@pytest.mark.parametrize("family,window", [("mistral", 2), ("gemma3", 3), ("qwen2", 4)])
def test_lossless_with_window_shallower_than_tree(family, window, runner_cls):
    config = small_window_configs(window)[family]
    model = build(config)
    runner = runner_cls(model)
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr80"), topk=TOPK)
    mismatches = []
    for _ in range(2):
        for prompt_name, prompt in PROMPTS.items():
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = model.generate(
                    ids, do_sample=False, max_new_tokens=N, attention_mask=torch.ones_like(ids), pad_token_id=0
                )
            if flat(run(runner, drafter, prompt, N)) != out[0, len(prompt) :].tolist():
                mismatches.append(prompt_name)
    assert not mismatches, f"{family} window {window}: output differs from greedy for {mismatches}"
