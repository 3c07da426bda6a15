"""What the server is told at start: its model name, API key, defaults and limits."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidOptionError

DEFAULT_MAX_TOKENS = 512  # a request that gives no max_tokens gets as many as fit, up to this
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_SAVE_EVERY_S = 60.0  # a crash loses at most this much of what the table learned
API_KEY_ENV = "TOKENRECYCLE_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str | None = None  # None: the engine's model name (smollm2, a directory's name)
    api_key: str | None = None  # None: no key needed
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retry_after_s: int = 1  # what a 429 tells the client to wait
    disconnect_poll_s: float = 0.25  # how often a request with nothing new checks its client is still there
    save_every_s: float = DEFAULT_SAVE_EVERY_S  # how often the app's on_interval runs (the table's periodic save)

    def __post_init__(self):
        for name in ("default_max_tokens", "max_body_bytes", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name in ("disconnect_poll_s", "save_every_s"):
            if not getattr(self, name) > 0:
                raise InvalidOptionError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("served_model_name", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidOptionError(f"{name} must be a non-empty string when given")


@dataclass(frozen=True)
class ReplicaSettings:
    """How many model replicas serve on Ray, and with how many threads each.

    `replicas` is the number to start with; autoscaling (any of the three autoscaling fields set)
    lets Ray Serve move it between `min_replicas` and `max_replicas`, aiming at
    `target_ongoing_requests` per replica. `threads` None: the cores divided by the most replicas
    there may be, so that replicas x threads = cores."""

    replicas: int = 1
    threads: int | None = None
    address: str | None = None  # None: a local Ray instance on 127.0.0.1, started and stopped here
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    def __post_init__(self):
        for name in ("replicas", "threads", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidOptionError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise InvalidOptionError(f"--target-ongoing-requests must be positive, got {self.target_ongoing_requests!r}")
        if self.address is not None and not self.address.strip():
            raise InvalidOptionError("--ray-address must not be empty")
        if self.autoscaling and not self.lowest <= self.replicas <= self.most:
            raise InvalidOptionError(f"--replicas {self.replicas} must lie between --min-replicas {self.lowest} and --max-replicas {self.most}")

    @property
    def autoscaling(self) -> bool:
        return any(value is not None for value in (self.min_replicas, self.max_replicas, self.target_ongoing_requests))

    @property
    def lowest(self) -> int:
        return self.min_replicas if self.min_replicas is not None else 1

    @property
    def most(self) -> int:
        """The most replicas there may be: what the cores are shared by."""
        if not self.autoscaling:
            return self.replicas
        return self.max_replicas if self.max_replicas is not None else max(self.replicas, self.lowest)

    def threads_per_replica(self, cores: int) -> int:
        return self.threads if self.threads is not None else max(1, cores // self.most)

    def autoscaling_config(self) -> dict | None:
        if not self.autoscaling:
            return None
        config = {"min_replicas": self.lowest, "max_replicas": self.most, "initial_replicas": self.replicas}
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return config
