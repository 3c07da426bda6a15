"""Plain decoding with transformers' own `model.generate`: the reference for exactness and the
baseline for speed (greedy, or sampling with the same settings)."""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def hf_generate(
    model, prompt_ids: np.ndarray, max_new_tokens: int, eos_ids: set[int], **generate_options
) -> list[int]:
    """transformers' `model.generate`, greedy unless the options sample; options pass through
    (prompt lookup, assistant model, sampling settings)."""
    ids = torch.as_tensor(prompt_ids, device=model.device)[None]
    generate_options.setdefault("do_sample", False)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=min(eos_ids, default=0),
        **generate_options,
    )
    return out[0, len(prompt_ids) :].tolist()
