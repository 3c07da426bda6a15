"""Runner for stock Hugging Face causal LMs: a DynamicCache and 4-D tree masks."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from ..errors import UnsupportedModelError
from ..trees import DraftTree, tree_visibility
from .base import DEFAULT_SLOTS, Loop, ModelRunner, RunnerKind, additive_mask

# How each supported family takes a custom mask:
#   "single": one 4-D mask for every layer (window applied if the config has a sliding window);
#   "by_layer_type": a dict keyed by config.layer_types ("full_attention" / "sliding_attention").
MASK_STYLE = {
    "llama": "single",
    "mistral": "single",
    "qwen2": "by_layer_type",
    "qwen3": "by_layer_type",
    "gemma3_text": "by_layer_type",
}


def check_supported(config) -> None:
    """Refuse, before any weights load, an architecture whose tree masks are not known to be right."""
    model_type = config.model_type
    if model_type not in MASK_STYLE:
        supported = ", ".join(sorted(MASK_STYLE))
        raise UnsupportedModelError(
            f"architecture '{model_type}' is not supported for tree verification (supported: {supported})"
        )


class HFRunner(ModelRunner):
    """Verifies trees with the model's own attention code; each slot's cache grows by concatenation."""

    kind = RunnerKind.HF
    loop = Loop.TRANSFORMERS

    def __init__(self, model: PreTrainedModel, max_slots: int = DEFAULT_SLOTS):
        super().__init__(max_slots)
        check_supported(model.config)
        self.model = model
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self._mask_style = MASK_STYLE[config.model_type]
        self._window = getattr(config, "sliding_window", None)
        self.device = model.device
        self._mask_dtype = model.dtype
        self._caches = [DynamicCache() for _ in range(max_slots)]
        self._committed = [0] * max_slots
        # transformers 5.24 renamed the cache argument (the old name goes in 5.40); a GPU machine's
        # own older transformers still takes the old one
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_length(self, slot: int) -> int:
        return self._committed[slot]

    @property
    def cache_bytes(self) -> int:
        return sum(
            layer.keys.nbytes + layer.values.nbytes
            for cache in self._caches for layer in cache.layers if getattr(layer, "keys", None) is not None
        )  # fmt: skip

    @torch.inference_mode()
    def prefill(self, slot: int, input_ids: np.ndarray, reserve: int = 0) -> torch.Tensor:
        self._check_slot(slot)
        self._caches[slot] = DynamicCache()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)[None]
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self._caches[slot]})
        self._committed[slot] = ids.shape[1]
        return out.logits[0].float()

    @torch.inference_mode()
    def forward_tree(self, slot: int, tree: DraftTree) -> torch.Tensor:
        self._check_slot(slot)
        start = self._committed[slot]
        ids = torch.as_tensor(tree.tokens, device=self.device)[None]
        positions = torch.as_tensor(start + tree.depths, device=self.device)[None]
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=self._masks(tree, start),
            use_cache=True,
            **{self._cache_arg: self._caches[slot]},
        )
        return out.logits[0].float()

    @torch.inference_mode()
    def commit(self, slot: int, accepted: np.ndarray) -> None:
        self._check_slot(slot)
        start = self._committed[slot]
        source = torch.as_tensor(start + accepted, device=self.device)
        end = start + len(accepted)
        for layer in self._caches[slot].layers:
            # Gather the accepted rows down into place, then cut the rejected tail off (a view).
            layer.keys[:, :, start:end] = layer.keys.index_select(2, source)
            layer.values[:, :, start:end] = layer.values.index_select(2, source)
            layer.keys = layer.keys[:, :, :end]
            layer.values = layer.values[:, :, :end]
        self._committed[slot] = end

    def _masks(self, tree: DraftTree, start: int):
        if self._mask_style == "single":
            return self._additive_mask(tree, start, self._window)
        layer_types = set(self.model.config.layer_types)
        return {
            kind: self._additive_mask(tree, start, self._window if kind == "sliding_attention" else None)
            for kind in layer_types
        }

    def _additive_mask(self, tree: DraftTree, start: int, window: int | None) -> torch.Tensor:
        return additive_mask(tree_visibility(tree, start, window), self._mask_dtype, self.device)[None, None]
