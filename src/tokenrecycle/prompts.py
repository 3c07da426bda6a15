"""Prompts to token ids: text (a user turn), chat messages, or ids already encoded; and a model's EOS ids."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import EmptyPromptError, InvalidOptionError

# What a prompt may be: text (a user turn), chat messages ({"role", "content"} dicts, for
# multi-turn conversations) or token ids already encoded.
Prompt = str | Sequence[dict] | np.ndarray


def encode_prompt(tokenizer, prompt: Prompt, chat: bool | None = None, vocab_size: int | None = None) -> np.ndarray:
    """Token ids of a prompt; instruct models get their chat template unless chat=False.
    Messages without a chat template are joined as plain text; token ids pass through, checked
    against the model's vocabulary."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or len(prompt) == 0:
            raise EmptyPromptError("the prompt is empty")
        if vocab_size is not None:
            check_token_ids(prompt, vocab_size)
        return prompt.astype(np.int64, copy=False)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages:
        raise EmptyPromptError("the prompt is empty")
    for message in messages:
        check_prompt_text(str(message.get("content", "")))
    use_chat = tokenizer.chat_template is not None if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def check_token_ids(ids, vocab_size: int) -> None:
    """Token ids the model has."""
    bad = [int(t) for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise InvalidOptionError(f"token ids outside the vocabulary (0 to {vocab_size - 1}): {bad[:5]}")


def check_prompt_text(text: str) -> str:
    """Text with something in it besides white space (checked before any model loads)."""
    if not text.strip():
        raise EmptyPromptError("the prompt is empty")
    return text


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
