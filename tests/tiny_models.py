"""Tiny randomly initialised models of every supported family, shared by the tiny-model tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from tokenrecycle.trees.templates import TEMPLATES
from tokenrecycle.trees import compile_template

VOCAB = 256

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,  # generate must not stop early: both sides produce exactly N tokens
    pad_token_id=None,
)


def tiny_configs():
    """Windows of 7-8 tokens: far below the prompt + output lengths, above the deepest template (6)."""
    return {
        "llama": LlamaConfig(num_hidden_layers=2, **COMMON),
        # layers >= max_window_layers slide: full, full, sliding, sliding
        "qwen2": Qwen2Config(
            num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2, **COMMON
        ),
        "qwen3": Qwen3Config(num_hidden_layers=2, **COMMON),
        "qwen3_sliding": Qwen3Config(
            num_hidden_layers=3, use_sliding_window=True, sliding_window=7, max_window_layers=1, **COMMON
        ),
        "mistral": MistralConfig(num_hidden_layers=2, sliding_window=8, **COMMON),
        "gemma3": Gemma3TextConfig(
            num_hidden_layers=3,
            sliding_window=7,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            **COMMON,
        ),
    }


def small_window_configs(window: int):
    """Windows no larger than a deep tree, so the window also cuts inside the tree."""
    return {
        "mistral": MistralConfig(num_hidden_layers=2, sliding_window=window, **COMMON),
        "qwen2": Qwen2Config(
            num_hidden_layers=2, use_sliding_window=True, sliding_window=window, max_window_layers=1, **COMMON
        ),
        "gemma3": Gemma3TextConfig(
            num_hidden_layers=2,
            sliding_window=window,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            **COMMON,
        ),
    }


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def trimmed(name: str, topk: int = 8):
    """A shipped template cut to ranks < topk (prefix-closed: a kept path's parent is kept too)."""
    return compile_template([p for p in TEMPLATES[name] if max(p) < topk], topk)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two threads thrash when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from tokenrecycle.models import bundled_gguf, gguf_to_safetensors

    return AutoTokenizer.from_pretrained(gguf_to_safetensors(bundled_gguf("smollm2")))


def save_tiny_llama(path, tokenizer, layers: int, seed: int):
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=layers, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_pair(root, target_layers: int, seeds=(0, 1)) -> tuple[str, str]:
    """A tiny target and a one-layer draft that share SmolLM2's tokenizer (and chat template)."""
    tokenizer = smollm2_tokenizer()
    return save_tiny_llama(root / "target", tokenizer, target_layers, seeds[0]), save_tiny_llama(root / "draft", tokenizer, 1, seeds[1])
