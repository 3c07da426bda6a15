"""Linear layers whose weights are laid out once for this machine's matrix kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from .native import INT4, PLAIN, PREPACKED

INT4_GROUP = 32  # inputs per int4 group; a GGUF Q4 block has 32 weights too


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking on the CPU: for bfloat16 weights where the CPU has bf16 instructions, and
    for float32 weights. Besides being faster than F.linear at a few rows, its kernels give each
    row the same result whatever the number of rows in the call (F.linear's float32 kernel picks
    its blocking by the row count), so a request's logits do not depend on what shares its pass."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fuse(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix for projections that read the same input (q/k/v; gate/up): one kernel call."""
    if all(b is None for b in biases):
        return torch.cat(weights), None
    return torch.cat(weights), torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])


class Linear:
    """y = x @ weight.T + bias for 2-D x, the weight prepacked where that pays."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        if can_prepack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            self.weight = None  # the packed copy is all that is needed
        else:
            self._packed = None
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def native_parts(self) -> tuple:
        """(weight, bias, int4 scales, kind) for the C++ decoder loop (native.py)."""
        if self._packed is not None:
            return self._packed, self.bias, None, PREPACKED
        return self.weight, self.bias, None, PLAIN


class Int4Linear:
    """Weight-only 4-bit: each group of 32 inputs of a row has a bfloat16 scale and zero, and
    w = (q - 8) * scale + zero with q in 0..15 (min-max rounding). Activations stay bfloat16.

    This defines a model of its own: its outputs are compared with plain decoding of the same
    quantised weights, not with the unquantised model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        check_int4(weight)
        rows, cols = weight.shape
        groups = weight.detach().float().view(rows, cols // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(rows, cols), 1)
        zero = low + 8 * scale
        self._scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._packed, INT4_GROUP, self._scales_zeros)
        return y if self.bias is None else y + self.bias

    def native_parts(self) -> tuple:
        return self._packed, self.bias, self._scales_zeros, INT4


def check_int4(weight: torch.Tensor) -> None:
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        raise InvalidOptionError("int4 weights need a bfloat16 model on the CPU (use --dtype bfloat16)")
    if weight.shape[1] % INT4_GROUP:
        raise InvalidOptionError(f"int4 weights need input sizes divisible by {INT4_GROUP}, got {weight.shape[1]}")


LINEARS = {None: Linear, "int4": Int4Linear}


def check_quantize(quantize: str | None) -> None:
    if quantize not in LINEARS:
        formats = ", ".join(kind for kind in LINEARS if kind)
        raise InvalidOptionError(f"quantize must be one of {formats} or none, got '{quantize}'")
