"""Exactness on the larger bundled model, Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases, an
untied LM head, ChatML), float32 on the fast runner: a smaller prompt set than SmolLM2's, since
every token costs four times as much (the budget of `make test` is 20 minutes on two cores)."""

import pytest

from real_models import assert_sampling_exact, generate_baselines, greedy_mismatches
from tokenrecycle.sampling import Sampling

pytestmark = pytest.mark.qwen

PROMPTS = [
    # code
    "Write a Python function that reverses a string.",
    "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"",
    "Write a SQL query that counts the orders per customer.",
    "Explain what this code does: for i in range(10): print(i * i)",
    "Write a JavaScript function that sums an array of numbers.",
    # chat
    "Explain in three sentences why the sky is blue.",
    "What is 12 times 12? Show your work.",
    "List the days of the week.",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def qwen():
    from tokenrecycle import Generator
    from tokenrecycle.runners import FastRunner

    generator = Generator("qwen2.5-coder-0.5b", dtype="float32", runner="fast")
    assert isinstance(generator.runner, FastRunner)
    return generator


@pytest.fixture(scope="module")
def baselines(qwen):
    return generate_baselines(qwen, PROMPTS, MAX_NEW)


def test_loaded_as_qwen2_with_chatml_and_its_eos(qwen):
    config = qwen.engine.loaded.model.config
    assert config.model_type == "qwen2" and not config.tie_word_embeddings
    assert qwen.engine.eos_ids == {151645}  # <|im_end|>
    text = qwen.tokenizer.decode(qwen.encode("Hi"))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("drafter", ["recycling", "auto"])
def test_greedy_drafting_matches_generate(qwen, baselines, drafter):
    qwen.set_tree(None)
    mismatches, longest = greedy_mismatches(qwen, baselines, MAX_NEW, drafter=drafter)
    assert not mismatches, f"{drafter}: outputs differ from model.generate on {mismatches}"
    assert longest >= 3  # drafted paths were accepted, not only verified


def test_sampling_through_the_fast_runner_is_exact(qwen):
    """Three sampled tokens, top-k 2, a raw prompt of five tokens and a small tree: every outcome
    of the enumeration replays the prefill and the steps, so both are kept short."""
    assert_sampling_exact(qwen, "def add(a, b):", Sampling(temperature=0.8, top_k=2), template="tr4", chat=False)
