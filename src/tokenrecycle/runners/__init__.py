"""Model runners: KV-cache slots, a draft tree forwarded on top of one, the accepted path committed."""

from __future__ import annotations

from ..errors import InvalidOptionError, UnsupportedModelError
from .base import DEFAULT_SLOTS, Loop, ModelRunner, RunnerKind, check_slots
from .fast import FastRunner, fast_unsupported_reason
from .hf import HFRunner, check_supported
from .linear import LINEARS, check_quantize

RUNNERS = ("auto", "fast", "hf")
QUANTIZE = tuple(kind for kind in LINEARS if kind is not None)  # weight formats beside the dtype's own


def check_runner_options(kind: str, quantize: str | None, dtype: str, max_slots: int = DEFAULT_SLOTS) -> None:
    """Refuse a runner kind, weight format or slot count that cannot work, before any model is loaded."""
    check_slots(max_slots)
    if kind not in RUNNERS:
        raise InvalidOptionError(f"runner must be one of {', '.join(RUNNERS)}, got '{kind}'")
    check_quantize(quantize)
    if quantize is not None and kind == "hf":
        raise InvalidOptionError(f"quantize={quantize} needs the fast runner, not runner=hf")
    if quantize is not None and dtype != "bfloat16":
        raise InvalidOptionError(f"quantize={quantize} needs bfloat16 activations, not {dtype}")


def make_runner(
    model, kind: str = "auto", quantize: str | None = None, max_slots: int = DEFAULT_SLOTS, gguf=None
) -> ModelRunner:
    """`fast` for the families it supports, `hf` (transformers' own forward) for the rest; `auto`
    picks fast where it can. Quantised weights exist only on the fast runner; gguf: the file the
    model came from, for quantize="gguf"."""
    check_runner_options(kind, quantize, str(model.dtype).removeprefix("torch."), max_slots)
    reason = fast_unsupported_reason(model.config)
    if quantize is not None and reason is not None:
        raise InvalidOptionError(f"quantize={quantize} needs the fast runner ({reason})")
    if kind == "hf":
        return HFRunner(model, max_slots)
    if reason is None:
        return FastRunner(model, quantize, max_slots=max_slots, gguf=gguf)
    if kind == "fast":
        raise UnsupportedModelError(f"the fast runner cannot run this model: {reason}")
    return HFRunner(model, max_slots)


__all__ = [
    "DEFAULT_SLOTS", "FastRunner", "HFRunner", "Loop", "ModelRunner", "QUANTIZE", "RUNNERS", "RunnerKind",
    "check_runner_options", "check_supported", "make_runner",
]
