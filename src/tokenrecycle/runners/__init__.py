"""Model runners: forward a draft tree on top of a KV cache, commit the accepted path."""

from .base import ModelRunner
from .hf import HFRunner, check_supported

__all__ = ["ModelRunner", "HFRunner", "check_supported"]
