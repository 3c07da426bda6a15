"""Model runners: forward a draft tree on top of a KV cache, commit the accepted path."""

from __future__ import annotations

from ..errors import InvalidOptionError, UnsupportedModelError
from .base import ModelRunner
from .fast import FastRunner, fast_unsupported_reason
from .hf import HFRunner, check_supported

RUNNERS = ("auto", "fast", "hf")


def make_runner(model, kind: str = "auto", quantize: str | None = None) -> ModelRunner:
    """`fast` for the families it supports, `hf` (transformers' own forward) for the rest; `auto`
    picks fast where it can. Quantised weights exist only on the fast runner."""
    if kind not in RUNNERS:
        raise InvalidOptionError(f"runner must be one of {', '.join(RUNNERS)}, got '{kind}'")
    reason = fast_unsupported_reason(model.config)
    if quantize is not None and (kind == "hf" or reason is not None):
        raise InvalidOptionError(f"quantize={quantize} needs the fast runner" + (f" ({reason})" if reason else ""))
    if kind == "hf":
        return HFRunner(model)
    if reason is None:
        return FastRunner(model, quantize)
    if kind == "fast":
        raise UnsupportedModelError(f"the fast runner cannot run this model: {reason}")
    return HFRunner(model)


__all__ = ["ModelRunner", "HFRunner", "FastRunner", "RUNNERS", "make_runner", "check_supported"]
