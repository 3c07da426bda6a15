"""One request to an engine: its settings, its state, its output so far, and its result.

A request holds everything that belongs to it: the prompt's token ids, its KV-cache slot, its
drafter, its verifier and random draws (inside its decoding loop), its output assembler (EOS,
stop strings, max tokens, streamed text), its timings and statistics. The engine moves it from
waiting to running to finished (or cancelled); nothing in it depends on the other requests.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from .decoding import DecodingLoop, Step
from .drafters import Drafter
from .errors import InvalidOptionError
from .sampling import Sampling
from .text import OutputAssembler, check_stop_strings

DEFAULT_MAX_NEW_TOKENS = 128
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows


@dataclass(frozen=True)
class TokenLogprob:
    """A decided token's log-probability under the target model (its raw logits, as OpenAI and vLLM
    report it) and the most likely tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(tokens: Sequence[int], logits, top: int) -> list[TokenLogprob]:
    """Each token's log-probability from the logits row that predicted it, with the `top` best."""
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    # Gathered where the logits are, then one transfer each: not one per token (on a GPU, a sync each).
    rows = torch.arange(len(tokens), device=logp.device)
    chosen = logp[rows, torch.as_tensor(list(tokens), dtype=torch.long, device=logp.device)].tolist()
    best = torch.topk(logp, top, dim=-1) if top else None
    indices, values = (best.indices.tolist(), best.values.tolist()) if best is not None else ([()] * len(tokens),) * 2
    return [TokenLogprob(int(t), chosen[i], tuple(zip(indices[i], values[i]))) for i, t in enumerate(tokens)]


@dataclass(frozen=True)
class RequestSettings:
    """What a caller may choose per request. `drafter`: None for the engine's default drafter, a
    registry name (`tokenrecycle.drafters.registry.DRAFTERS`) or a Drafter object of the caller's.
    `sampling`: None decodes greedily."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: Sequence[str] = ()
    sampling: Sampling | None = None
    drafter: str | Drafter | None = None
    chat: bool | None = None  # None: the chat template where the model has one
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely

    def __post_init__(self):
        tokens = self.max_new_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise InvalidOptionError(f"max_new_tokens must be a whole number of at least 1, got {tokens!r}")
        object.__setattr__(self, "stop", tuple(check_stop_strings(self.stop)))
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidOptionError(f"logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")


class RequestState(enum.Enum):
    WAITING = "waiting"  # for a free slot
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"  # an error ended it (request.error)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    steps: int  # target-model forward passes that decided tokens, the prefill included
    seconds: float
    stop_reason: str
    accepted_lengths: list[int] = field(default_factory=list)  # tokens decided per step
    logprobs: list[TokenLogprob] | None = None  # per token, when the request asked for them

    @property
    def mean_accepted(self) -> float:
        """Mean tokens decided per forward pass (MAT); exactly 1.0 for plain decoding."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_lengths).items()))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(mean_accepted=self.mean_accepted, tokens_per_s=self.tokens_per_s)
        return data

    def stats_line(self) -> str:
        return (
            f"{self.new_tokens} new tokens in {self.steps} steps · MAT {self.mean_accepted:.2f} · "
            f"{self.tokens_per_s:.1f} tokens/s ({self.seconds:.2f} s, stop: {self.stop_reason})"
        )


@dataclass(frozen=True)
class Update:
    """What one engine step decided for one request: its new tokens, the text now safe to show,
    and whether the request has ended."""

    request: Request
    tokens: list[int]
    text: str
    finished: bool
    step: Step | None  # the forward pass behind it: its tree and accepted path (None: it failed)
    logprobs: list[TokenLogprob] | None = None  # for `tokens`, when the request asked for them


_ids = itertools.count(1)
_UNFINISHED = {RequestState.CANCELLED: "cancelled", RequestState.FAILED: "error"}


class Request:
    def __init__(self, prompt_ids: np.ndarray, settings: RequestSettings, drafter: Drafter, assembler: OutputAssembler):
        self.id = f"req-{next(_ids)}"
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.drafter = drafter
        self.assembler = assembler
        self.state = RequestState.WAITING
        self.slot: int | None = None
        self.loop: DecodingLoop | None = None
        self.accepted_lengths: list[int] = []  # tokens kept per step, after stops
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token_at: float | None = None
        self.ended: float | None = None
        self._cancel_asked = False
        self.error: Exception | None = None

    # ---- for the caller ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request; the engine frees its slot before its next step."""
        self._cancel_asked = True

    @property
    def cancel_asked(self) -> bool:
        return self._cancel_asked

    @property
    def finished(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)

    @property
    def text(self) -> str:
        return self.assembler.text

    @property
    def result(self) -> GenerationResult | None:
        """The outcome once the request has ended (cancelled: what it had decided by then)."""
        if not self.finished:
            return None
        return GenerationResult(
            text=self.assembler.text,
            token_ids=list(self.assembler.tokens),
            prompt_tokens=len(self.prompt_ids),
            new_tokens=len(self.assembler.tokens),
            steps=len(self.accepted_lengths),
            seconds=(self.ended or 0.0) - (self.started or self.ended or 0.0),
            stop_reason=self.assembler.stop_reason or _UNFINISHED.get(self.state, "length"),
            accepted_lengths=list(self.accepted_lengths),
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )

    # ---- for the engine ----------------------------------------------------------------------
    def start(self, loop: DecodingLoop, slot: int) -> None:
        self.loop, self.slot = loop, slot
        self.state = RequestState.RUNNING
        self.started = time.perf_counter()

    def take(self, step: Step) -> Update:
        """Add one step's tokens to the output; the request ends at a stop or its last token."""
        before = len(self.assembler.tokens)
        piece = self.assembler.add(step.tokens)
        kept = self.assembler.tokens[before:]
        self.accepted_lengths.append(len(kept))
        logprobs = None
        if self.logprobs is not None:
            logprobs = token_logprobs(kept, step.predicting_logits(), self.settings.logprobs)
            self.logprobs += logprobs
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        finished = self.assembler.done or self.loop.done
        if finished:
            self.end(RequestState.FINISHED)
        return Update(self, kept, piece, finished, step, logprobs)

    def fail(self, error: Exception) -> None:
        self.error = error
        self.end(RequestState.FAILED)

    def end(self, state: RequestState) -> None:
        self.state = state
        self.ended = time.perf_counter()
