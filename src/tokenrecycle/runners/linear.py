"""Linear layers whose weights are laid out once for this machine's matrix kernels."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from . import quant
from .native import INT4, PLAIN, PREPACKED, QUANT, native_module

INT4_GROUP = 32  # inputs per int4 group; a GGUF Q4 block has 32 weights too
# 1: --quantize int4 on the C++ kernel. Off by default: on the 2-core AMX machine it is far flatter
# with rows (16 tokens 1.6x one, torch's 3.2x) and faster per matrix in isolation, but a whole
# one-token step still costs more (11.7 against 10.3 ms on SmolLM2), so plain int4 decoding ran at
# 89 against 104 tokens/s and the best int4 setup stays on torch's kernel
# (scripts/bench_int4_runners.py). --quantize gguf always uses it.
QMATMUL_SWITCH = "TOKENRECYCLE_QMATMUL"


def int4_on_kernel() -> bool:
    return os.environ.get(QMATMUL_SWITCH, "0") == "1" and not isinstance(native_module(), str)


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
        """(weight, bias, scales, minimums, outputs, kind) for the C++ decoder loop (native.py)."""
        if self._packed is not None:
            return self._packed, self.bias, None, None, 0, PREPACKED
        return self.weight, self.bias, None, None, 0, PLAIN


class QuantLinear:
    """Weight-only 4 or 8 bits in the C++ extension's kernel (quant.py's groups of 32 with a float32
    scale and minimum), for the few rows of a step: each group is unpacked once per call and applied
    to every row, so a 16-row tree costs little more than one row. Activations stay bfloat16."""

    def __init__(self, weight: quant.QuantWeight, bias: torch.Tensor | None, module):
        self.weight, self.bias, self._module = weight, bias, module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self._module.qlinear(x, w.packed, w.scales, w.mins, w.n, w.bits, self.bias)

    def native_parts(self) -> tuple:
        w = self.weight
        return w.packed, self.bias, w.scales, w.mins if w.bits == 4 else None, w.n, QUANT


def quant_kernel(quantize: str) -> str:
    """The matrix kernel of a quantised runner: the C++ one's variant, or torch's int4 kernel."""
    module = native_module()
    if isinstance(module, str):
        return "torch-int4" if quantize == "int4" else "onednn-bf16"
    return f"qmatmul-{module.qkernel_name()}" if quantize == "gguf" or int4_on_kernel() else "torch-int4"


def int4_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Weight-only 4-bit, min-max per group of 32 inputs: w = q * scale + min, q in 0..15.

    This defines a model of its own: its outputs are compared with plain decoding of the same
    quantised weights, not with the unquantised model. torch's int4 kernel (bf16 scales), or the
    C++ kernel (float32 scales) where TOKENRECYCLE_QMATMUL=1 and the extension builds."""
    check_int4(weight)
    if not int4_on_kernel():
        return TorchInt4Linear(weight, bias)
    return QuantLinear(quant.quantize4(weight), bias, native_module())


class TorchInt4Linear:
    """torch's CPU int4 kernel: each group of 32 inputs of a row has a bfloat16 scale and zero,
    w = (q - 8) * scale + zero with q in 0..15 (min-max rounding). The fallback where the C++
    extension does not build, and the reference the kernel is tested against; its cost grows with
    every row (8 rows cost about 2x one)."""

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
        return self._packed, self.bias, self._scales_zeros, None, 0, INT4


def check_int4(weight: torch.Tensor) -> None:
    """Both 4-bit formats (the kernel's and torch's) need bf16 weights on the CPU, groups of 32."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        raise InvalidOptionError("int4 weights need a bfloat16 model on the CPU (use --dtype bfloat16)")
    if weight.shape[1] % INT4_GROUP:
        raise InvalidOptionError(f"int4 weights need input sizes divisible by {INT4_GROUP}, got {weight.shape[1]}")


LINEARS = {None: Linear, "int4": int4_linear, "gguf": None}  # gguf: the file's own weights (make_linear)


def make_linear(modules: list[torch.nn.Linear], quantize: str | None, gguf: dict | None = None):
    """One layer over projections that read the same input, in the weight format asked for; gguf:
    {parameter: QuantWeight} read from the model's file (gguf_weights.py), keyed by id of the weight."""
    weight, bias = fuse([m.weight.detach() for m in modules], [None if m.bias is None else m.bias.detach() for m in modules])
    if quantize != "gguf":
        return LINEARS[quantize](weight, bias)
    module = native_module()
    if isinstance(module, str):  # no kernel: the same weights, dequantised by transformers, in bf16
        return Linear(weight, bias)
    return QuantLinear(quant.concat([gguf[id(m.weight)] for m in modules]), bias, module)


def head_linear(weight: torch.Tensor, quantize: str | None, gguf: quant.QuantWeight | None = None):
    """The LM head: the GGUF's own weights (gguf), else bf16. An 8-bit head does not pay on these
    machines: the head's weights fit the cache, so its cost is arithmetic, and oneDNN's bf16 kernel
    beat the 8-bit one at every row count (1.8 against 2.6 ms for one row on SmolLM2's head)."""
    module = native_module()
    if isinstance(module, str) or quantize != "gguf":
        return Linear(weight)
    return QuantLinear(gguf, None, module)


def check_quantize(quantize: str | None) -> None:
    if quantize not in LINEARS:
        formats = ", ".join(kind for kind in LINEARS if kind)
        raise InvalidOptionError(f"quantize must be one of {formats} or none, got '{quantize}'")
