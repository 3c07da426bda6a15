"""Lossless sampling through the real runners: tiny random Llama and Gemma3 models, both runners,
plain and Token Recycling drafters, exact output distributions (enumeration.py) against the
model's own conditionals. Top-k 3 keeps the enumeration to 27 outcomes of three tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tokenrecycle.drafters import PlainDrafter, TokenRecyclingDrafter
from tokenrecycle.runners import FastRunner, HFRunner
from tokenrecycle.sampling import Sampling
from tokenrecycle.verify import SamplingVerifier

from enumeration import output_distribution
from tiny_models import VOCAB, build, one_thread, tiny_configs, trimmed  # noqa: F401

TOKENS = 3
PROMPT = np.array([3, 41, 97, 200, 5, 3, 41], dtype=np.int64)
SAMPLING = Sampling(temperature=0.8, top_k=3)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, one_thread):
    return build(tiny_configs()[request.param])


@torch.inference_mode()
def plain_distribution(model) -> dict[tuple, float]:
    frontier = {(): 1.0}
    for _ in range(TOKENS):
        grown = {}
        for prefix, probability in frontier.items():
            ids = torch.tensor([PROMPT.tolist() + list(prefix)])
            probs = SAMPLING.probabilities(model(ids).logits[0, -1])
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = probability * float(probs[token])
        frontier = grown
    return frontier


@torch.inference_mode()
def warm_drafter(model) -> TokenRecyclingDrafter:
    """A full table, every row the model's top 3 after the prompt and that token, so every root
    drafts a tree and drafts get accepted whichever tokens are sampled."""
    drafter = TokenRecyclingDrafter(VOCAB, trimmed("tr8", topk=3), topk=3)
    contexts = torch.cat([torch.tensor(PROMPT).repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], dim=1)
    drafter.table[:] = model(contexts).logits[:, -1].topk(3).indices.numpy()
    return drafter


@pytest.mark.parametrize("runner_cls", [HFRunner, FastRunner], ids=["hf", "fast"])
@pytest.mark.parametrize("drafting", ["plain", "recycling"])
def test_sampling_through_the_runners_is_exact(model, runner_cls, drafting):
    runner = runner_cls(model)
    warmed = warm_drafter(model) if drafting == "recycling" else PlainDrafter()
    accepted = []

    def make_drafter():
        return copy.deepcopy(warmed)

    def make_verifier(draws):
        verifier = SamplingVerifier(SAMPLING, draws)
        verify = verifier.verify

        def counting(tree, logits):
            path, token = verify(tree, logits)
            accepted.append(len(path) - 1)
            return path, token

        verifier.verify = counting
        return verifier

    actual = output_distribution(lambda: runner, make_drafter, make_verifier, PROMPT, TOKENS)
    expected = plain_distribution(model)
    for outcome in set(actual) | set(expected):
        assert actual.get(outcome, 0.0) == pytest.approx(expected.get(outcome, 0.0), abs=2e-5), outcome
    if drafting == "recycling":
        assert max(accepted) >= 1  # some outcomes went through accepted draft nodes
