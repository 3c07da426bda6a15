"""What the server is told at start: its model name, API key, defaults and limits."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError

DEFAULT_MAX_TOKENS = 512  # a request that gives no max_tokens gets as many as fit, up to this
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
API_KEY_ENV = "TOKENRECYCLE_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str | None = None  # None: the engine's model name (smollm2, a directory's name)
    api_key: str | None = None  # None: no key needed
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retry_after_s: int = 1  # what a 429 tells the client to wait
    disconnect_poll_s: float = 0.25  # how often a request with nothing new checks its client is still there

    def __post_init__(self):
        for name in ("default_max_tokens", "max_body_bytes", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not self.disconnect_poll_s > 0:
            raise InvalidOptionError(f"disconnect_poll_s must be positive, got {self.disconnect_poll_s!r}")
        for name in ("served_model_name", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidOptionError(f"{name} must be a non-empty string when given")
