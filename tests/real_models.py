"""Checks shared by the exactness tests on real models (SmolLM2, Qwen2.5-Coder): greedy outputs
against transformers' `model.generate`, and exact sampled distributions (enumeration.py) against
the model's own conditionals."""

from __future__ import annotations

import pytest
import torch

from enumeration import output_distribution
from tokenrecycle.sampling import Sampling
from tokenrecycle.verify import SamplingVerifier


def generate_baselines(generator, prompts, max_new_tokens: int) -> dict[str, list[int]]:
    return {p: generator.generate_with_transformers(p, max_new_tokens=max_new_tokens).token_ids for p in prompts}


def greedy_mismatches(generator, baselines: dict[str, list[int]], max_new_tokens: int, **options) -> tuple[list[str], int]:
    """The prompts whose output differs from their baseline, and the most tokens one step decided
    (above 2: a drafted path of two tokens or more was accepted, not only verified)."""
    mismatches, longest = [], 0
    for prompt, expected in baselines.items():
        result = generator.generate(prompt, max_new_tokens=max_new_tokens, **options)
        longest = max(longest, *result.accepted_lengths)
        if result.token_ids != expected:
            mismatches.append(prompt)
    return mismatches, longest


def assert_sampling_exact(generator, prompt: str, sampling: Sampling, tokens: int = 3, template: str = "tr8",
                          chat: bool | None = None) -> None:  # fmt: skip
    """The exact distribution of the first `tokens` sampled tokens through the generator's runner
    with Token Recycling, from a table warmed on the prompt's greedy answer (so drafts are
    accepted), equals the product of the model's own processed conditionals. chat=False: the
    prompt as raw text (shorter: every outcome replays the prefill)."""
    ids = generator.encode(prompt, chat)
    generator.set_tree(template)
    generator.generate(prompt, max_new_tokens=32, chat=chat)  # warm the table on this text
    recycling = generator.engine.recycling
    table = recycling.table.copy()

    def drafter():
        recycling.table[:] = table
        return recycling

    actual = output_distribution(lambda: generator.runner, drafter, lambda d: SamplingVerifier(sampling, d), ids, tokens)
    expected = model_distribution(generator.engine.loaded.model, ids.tolist(), sampling, tokens)
    assert set(actual) == set(expected)
    for outcome, probability in expected.items():
        assert actual[outcome] == pytest.approx(probability, abs=1e-5), outcome


@torch.inference_mode()
def model_distribution(model, prompt: list[int], sampling: Sampling, tokens: int) -> dict[tuple, float]:
    """Plain sampling's distribution of the next `tokens` tokens, straight from the model."""
    frontier = {(): 1.0}
    for _ in range(tokens):
        grown = {}
        for prefix, probability in frontier.items():
            probs = sampling.probabilities(model(torch.tensor([prompt + list(prefix)])).logits[0, -1])
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = probability * float(probs[token])
        frontier = grown
    return frontier
