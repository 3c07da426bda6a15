"""Linear layers whose weights are laid out once for this machine's matrix kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking pays for 16-bit weights on a CPU with bf16 instructions; float32 keeps
    F.linear, whose results the transformers runner shares bit for bit."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear:
    """y = x @ weight.T + bias for 2-D x; several weights can be fused into one matrix by `fused`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features = weight.shape[0]
        self.bias = bias
        if can_prepack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            self.weight = None  # the packed copy is all that is needed
        else:
            self._packed = None
            self.weight = weight.contiguous()

    @classmethod
    def fused(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> "Linear":
        """One matrix for projections that read the same input (q/k/v; gate/up): one kernel call."""
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
        )
        return cls(torch.cat(weights), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
