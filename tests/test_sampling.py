"""Lossless sampling over draft trees, checked by exact enumeration (see enumeration.py).

The exact distribution of the first tokens must equal plain sampling's, computed from the model
directly. A verifier with the biased rule fails the same check, so it can tell them apart.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np

import pytest
import torch

from fakes import decode_alone
from tokenrecycle.drafters import PlainDrafter, TokenRecyclingDrafter
from tokenrecycle.drafters.draft_model import DraftModelDrafter
from tokenrecycle.errors import InvalidOptionError
from tokenrecycle.sampling import Draws, Sampling
from tokenrecycle.trees import DraftTree, compile_template
from tokenrecycle.verify import SamplingVerifier

from enumeration import output_distribution
from fakes import ScriptedRunner, sequential_greedy

V = 5
TOKENS = 3  # the first three tokens: 125 outcomes
PROMPT = np.array([1, 2], dtype=np.int64)
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
SETTINGS = [
    Sampling(temperature=1.0, top_k=0),
    Sampling(temperature=0.7, top_k=3),
    Sampling(temperature=1.0, top_k=0, top_p=0.8),
    Sampling(temperature=1.3, top_k=0, min_p=0.2),
    Sampling(temperature=0.9, top_k=4, top_p=0.9, min_p=0.05),
]


def model_logits(context) -> torch.Tensor:
    """A fixed, uneven next-token distribution for every context (seeded by the context)."""
    seed = hash(tuple(int(t) for t in context[-3:])) % (2**31)
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


class SoftRunner(ScriptedRunner):
    def __init__(self):
        super().__init__(next_token=None, vocab_size=V)

    def _logits_for(self, context):
        return model_logits(context)


def output_of(make_verifier, make_drafter) -> dict[tuple, float]:
    return output_distribution(SoftRunner, make_drafter, make_verifier, PROMPT, TOKENS)


def plain_distribution(sampling: Sampling, logits=model_logits, vocab: int = V, tokens: int = TOKENS, prompt=PROMPT) -> dict[tuple, float]:
    """Plain sampling, from the model directly: the product of the processed conditionals."""
    distribution = {}
    for sequence in itertools.product(range(vocab), repeat=tokens):
        context, probability = list(prompt), 1.0
        for token in sequence:
            probability *= float(sampling.probabilities(logits(context))[token])
            context.append(token)
        if probability > 0:
            distribution[sequence] = probability
    return distribution


def recycling_drafter():
    """A table that drafts real trees from the first step: warmed as a hot table would be."""
    drafter = TokenRecyclingDrafter(V, compile_template(TREE, 3), topk=3)
    drafter.table[:] = [[(t + 1) % V, (t + 2) % V, (t + 3) % V] for t in range(V)]
    return drafter


def assert_same(actual: dict, expected: dict, tolerance: float = 1e-9):
    """Equal up to float rounding; a biased rule is off by far more (see the test it fails)."""
    for outcome in set(actual) | set(expected):
        assert actual.get(outcome, 0.0) == pytest.approx(expected.get(outcome, 0.0), abs=tolerance), outcome
    assert sum(actual.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
@pytest.mark.parametrize("drafter", [PlainDrafter, recycling_drafter], ids=["plain", "recycling"])
def test_speculative_sampling_has_plain_samplings_distribution(sampling, drafter):
    actual = output_of(lambda draws: SamplingVerifier(sampling, draws), drafter)
    assert_same(actual, plain_distribution(sampling))


def test_drafts_are_accepted_so_the_check_covers_tree_paths():
    sampling = SETTINGS[0]
    runner, drafter = SoftRunner(), recycling_drafter()
    steps = list(decode_alone(runner, drafter, PROMPT, 40, SamplingVerifier(sampling, Draws(seed=0))))
    assert max(len(step.tokens) for step in steps) >= 3  # two drafts and the bonus at least once


class BiasedVerifier(SamplingVerifier):
    """The draft-model rule misapplied to deterministic drafts: each child is accepted with
    probability min(1, p(x) / q(x)) = p(x), without renormalising by the mass already rejected."""

    def verify(self, tree: DraftTree, logits: torch.Tensor):
        path = [0]
        while True:
            probs = self.sampling.probabilities(logits[path[-1]]).clone()
            children = [c for c in range(1, len(tree)) if tree.parents[c] == path[-1]]
            for child in children:
                token = int(tree.tokens[child])
                if self.draws.draw(torch.tensor([1 - probs[token], probs[token]])) == 1:
                    path.append(child)
                    break
                probs[token] = 0
            else:
                return np.array(path), self.draws.draw(probs / probs.sum())


def test_the_check_catches_the_biased_rule():
    sampling = SETTINGS[0]
    actual = output_of(lambda draws: BiasedVerifier(sampling, draws), recycling_drafter)
    expected = plain_distribution(sampling)
    worst = max(abs(actual.get(k, 0) - expected.get(k, 0)) for k in set(actual) | set(expected))
    assert worst > 1e-3
    assert sum(actual.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}],
)
def test_bad_settings_are_refused(options):
    with pytest.raises(InvalidOptionError):
        Sampling(**options)


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_same_warpers_as_transformers_generate(sampling):
    """The processed distribution equals the one transformers' generate builds from the same settings."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.generation.logits_process import LogitsProcessorList

    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1, vocab_size=64))
    config = GenerationConfig(**sampling.generate_options())
    theirs = model._get_logits_processor(config, input_ids_seq_length=1, logits_processor=LogitsProcessorList(), device="cpu")
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    expected = torch.softmax(theirs(torch.zeros(4, 1, dtype=torch.long), logits.clone()), dim=-1)
    assert torch.allclose(sampling.probabilities(logits), expected)


# ---- drafts from a draft model: speculative sampling and RSD ---------------------------------
# Drafting draws too, so the enumeration branches more: a 3-token vocabulary.
SMALL_V = 3


def small_logits(context, salt: str = "target") -> torch.Tensor:
    # zlib's CRC, not hash(): Python salts string hashes per process, which made these logits
    # (and so whether a short run accepted long drafts) differ from one run to the next.
    seed = zlib.crc32(repr((salt, tuple(int(t) for t in context[-2:]))).encode()) % (2**31)
    return torch.randn(SMALL_V, generator=torch.Generator().manual_seed(seed)) * 1.5


class SmallRunner(ScriptedRunner):
    """The target (salt "target") or a draft model whose distribution differs from it."""

    def __init__(self, salt: str = "target"):
        super().__init__(next_token=None, vocab_size=SMALL_V)
        self.salt = salt

    def _logits_for(self, context):
        return small_logits(context, self.salt)


SMALL_SETTINGS = [Sampling(top_k=0), Sampling(temperature=0.7, top_k=2), Sampling(top_k=0, top_p=0.7, min_p=0.1)]
DRAFT_SHAPES = {"chain": dict(branching=(1, 1)), "adaptive chain": dict(branching=(1,), adaptive=True), "rsd tree": dict(branching=(2, 1))}


@pytest.mark.parametrize("sampling", SMALL_SETTINGS, ids=str)
@pytest.mark.parametrize("shape", DRAFT_SHAPES)
def test_draft_model_sampling_has_plain_samplings_distribution(sampling, shape):
    def drafter():
        return DraftModelDrafter(SmallRunner("draft"), **DRAFT_SHAPES[shape])

    actual = output_distribution(SmallRunner, drafter, lambda draws: SamplingVerifier(sampling, draws), PROMPT, 3)
    assert_same(actual, plain_distribution(sampling, small_logits, SMALL_V, 3), tolerance=1e-7)  # float32 p / q ratios


@pytest.mark.parametrize("shape", DRAFT_SHAPES)
def test_draft_model_greedy_is_exact(shape):
    def next_token(context):
        return int(small_logits(context).argmax())

    drafter = DraftModelDrafter(SmallRunner("draft"), **DRAFT_SHAPES[shape])
    out = []
    for step in decode_alone(SmallRunner(), drafter, PROMPT, 40):
        out += step.tokens
    assert out == sequential_greedy(next_token, PROMPT.tolist(), 40)


@pytest.mark.parametrize("shape", DRAFT_SHAPES)
def test_draft_model_drafts_are_accepted_and_its_cache_follows(shape):
    draft_runner = SmallRunner("draft")
    drafter = DraftModelDrafter(draft_runner, **DRAFT_SHAPES[shape])
    out, lengths = [], []
    for step in decode_alone(SmallRunner(), drafter, PROMPT, 60, SamplingVerifier(SMALL_SETTINGS[0], Draws(seed=0))):
        out += step.tokens
        lengths.append(len(step.tokens))
    assert max(lengths) >= 3
    # The draft's cache holds what was decided before the tokens it has yet to be fed.
    assert draft_runner.contexts[drafter._slot] + drafter._fed_before_root == PROMPT.tolist() + out[:-1]


# ---- stochastic beam search drafts: Gumbel noise cannot be enumerated, so a chi-square test ---
def test_conditioned_gumbels_keep_order_and_top_out_at_the_parent():
    from tokenrecycle.drafters.draft_model import conditioned_gumbel

    raw = torch.tensor([0.3, -1.2, 2.5, 0.9], dtype=torch.float64)
    shifted = conditioned_gumbel(raw, parent=-0.7)
    assert shifted.max().item() == pytest.approx(-0.7)
    assert torch.equal(torch.argsort(shifted), torch.argsort(raw))


def test_beam_search_drafts_greedy_is_exact():
    def next_token(context):
        return int(small_logits(context).argmax())

    drafter = DraftModelDrafter(SmallRunner("draft"), branching=(1, 1, 1), beam=2)
    out = [t for step in decode_alone(SmallRunner(), drafter, PROMPT, 40) for t in step.tokens]
    assert out == sequential_greedy(next_token, PROMPT.tolist(), 40)


def test_beam_search_drafts_sample_plain_samplings_distribution():
    from collections import Counter

    sampling = SMALL_SETTINGS[0]
    drafter = DraftModelDrafter(SmallRunner("draft"), branching=(1, 1), beam=2)
    verifier = SamplingVerifier(sampling, Draws(seed=0))
    counts, samples, accepted = Counter(), 3000, 0
    for _ in range(samples):
        steps = list(decode_alone(SmallRunner(), drafter, PROMPT, 3, verifier))
        counts[tuple(t for step in steps for t in step.tokens)[:3]] += 1
        accepted += sum(len(step.tokens) - 1 for step in steps)
    expected = plain_distribution(sampling, small_logits, SMALL_V, 3)
    outcomes = sorted(expected)
    assert set(counts) <= set(outcomes)
    statistic = sum((counts[o] - samples * expected[o]) ** 2 / (samples * expected[o]) for o in outcomes)
    assert statistic < chi_square_quantile(len(outcomes) - 1, z=3.09)  # p > 0.001
    assert accepted > samples // 4  # drafts were accepted, so the rule was exercised


def chi_square_quantile(df: int, z: float) -> float:
    """The chi-square quantile at the normal quantile z (Wilson-Hilferty; within 1% for df > 10)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
