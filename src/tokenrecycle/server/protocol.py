"""OpenAI's request bodies into what the engine takes, and the engine's results into OpenAI's shapes.

Translation only: each option is checked by its owner (RequestSettings, Sampling, the stop
strings' check, the engine); this module checks JSON types, refuses what tokenrecycle does not do
(n > 1, penalties, logit_bias, ...) and names the request field an owner's error is about.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidOptionError
from .. import prompts
from ..prompts import Prompt
from ..request import GenerationResult, RequestSettings, TokenLogprob
from ..sampling import Sampling
from .errors import ApiError
from .tokens import TokenPieces

MAX_STOP_STRINGS = 4  # as OpenAI's API allows
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
LOGPROB_FLOOR = -9999.0  # JSON has no -inf
SERVER_TOP_K = 0  # OpenAI samples the whole distribution: no top-k unless asked

INTEGER, NUMBER, BOOLEAN, TEXT = (int,), (int, float), (bool,), (str,)
_SAMPLING = {name: name for name in ("temperature", "top_k", "top_p", "min_p")}  # Sampling's names are OpenAI's


@dataclass(frozen=True)
class Generation:
    """One request, translated. `fill`: max_tokens was not given, so the request gets as many
    tokens as fit in the context, up to settings.max_new_tokens (the server's default)."""

    prompt: Prompt
    settings: RequestSettings
    fill: bool
    drafter: str | None = None  # a registry name; None: the server's default
    stream: bool = False
    include_usage: bool = False


# ---- requests ------------------------------------------------------------------------------
def check_model(body: dict, served: str) -> None:
    model = _get(body, "model", TEXT, "a string")
    if model is None:
        raise ApiError.invalid("model is required", "model")
    if model != served:
        raise ApiError(404, f"The model '{model}' does not exist: this server serves '{served}'", param="model", code="model_not_found")


def parse_chat(body: dict, default_max_tokens: int) -> Generation:
    _refuse_common(body)
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError.invalid(f"{name} are not supported: tokenrecycle answers in text", name)
    response_format = _get(body, "response_format", (dict,), "an object") or {}
    if response_format.get("type", "text") != "text":
        raise ApiError.invalid("response_format: only text is supported", "response_format")
    messages = _messages(body.get("messages"))
    asked = _get(body, "logprobs", BOOLEAN, "true or false", False)
    top = _get(body, "top_logprobs", INTEGER, "a whole number")
    if top is not None and not asked:
        raise ApiError.invalid("top_logprobs needs logprobs: true", "top_logprobs")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    logprobs = (top or 0) if asked else None
    settings, fill = _settings(body, default_max_tokens, tokens_field, logprobs, "top_logprobs", chat=None)
    return _generation(body, messages, settings, fill)


def parse_completion(body: dict, default_max_tokens: int) -> Generation:
    _refuse_common(body)
    if _get(body, "echo", BOOLEAN, "true or false", False):
        raise ApiError.invalid("echo is not supported", "echo")
    if body.get("suffix"):
        raise ApiError.invalid("suffix is not supported", "suffix")
    if _get(body, "best_of", INTEGER, "a whole number", 1) != 1:
        raise ApiError.invalid("best_of must be 1: one choice per request", "best_of")
    prompt = _prompt(body.get("prompt"))
    logprobs = _get(body, "logprobs", INTEGER, "a whole number")
    # A completion's prompt is raw text: no chat template.
    settings, fill = _settings(body, default_max_tokens, "max_tokens", logprobs, "logprobs", chat=False)
    return _generation(body, prompt, settings, fill)


def parse_tokenize(body: dict) -> tuple[Prompt, bool | None]:
    """/tokenize: {"prompt": text} (raw, as a completion) or {"messages": [...]} (the chat template)."""
    if body.get("messages") is not None:
        return _messages(body["messages"]), None
    if body.get("prompt") is None:
        raise ApiError.invalid("give prompt (text) or messages", "prompt")
    return _text(body["prompt"], "prompt"), False


def parse_detokenize(body: dict) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_integer(t) for t in tokens):
        raise ApiError.invalid("tokens must be a list of token ids", "tokens")
    return tokens


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    """Token ids the model has (prompts.check_token_ids), an error naming the field."""
    try:
        prompts.check_token_ids(ids, vocab_size)
    except InvalidOptionError as exc:
        raise ApiError.invalid(f"{param} holds {exc}", param) from None


def _generation(body: dict, prompt: Prompt, settings: RequestSettings, fill: bool) -> Generation:
    stream = _get(body, "stream", BOOLEAN, "true or false", False)
    options = _get(body, "stream_options", (dict,), "an object") or {}
    include_usage = _get(options, "include_usage", BOOLEAN, "true or false", False, "stream_options.include_usage")
    drafter = _get(body, "drafter", TEXT, "a drafter name")
    return Generation(prompt, settings, fill, drafter, stream, include_usage)


def _refuse_common(body: dict) -> None:
    n = _get(body, "n", INTEGER, "a whole number", 1)
    if n != 1:
        raise ApiError.invalid(f"n must be 1: tokenrecycle answers with one choice per request, got {n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, NUMBER, "a number", 0) != 0:
            raise ApiError.invalid(f"{name} is not supported: tokenrecycle decodes the model's own distribution exactly", name)
    if body.get("logit_bias"):
        raise ApiError.invalid("logit_bias is not supported: tokenrecycle decodes the model's own distribution exactly", "logit_bias")


def _settings(body: dict, default_max_tokens: int, tokens_field: str, logprobs, logprobs_field: str, chat: bool | None):
    max_tokens = _get(body, tokens_field, INTEGER, "a whole number")
    stop = _stop(body.get("stop"))
    temperature = _get(body, "temperature", NUMBER, "a number", 1.0)
    top_k = _get(body, "top_k", INTEGER, "a whole number", SERVER_TOP_K)
    top_p = _get(body, "top_p", NUMBER, "a number", 1.0)
    min_p = _get(body, "min_p", NUMBER, "a number")
    seed = _get(body, "seed", INTEGER, "a whole number")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError.invalid("seed must fit in 64 bits", "seed")
    owners_names = {"max_new_tokens": tokens_field, "logprobs": logprobs_field, "a stop string": "stop", **_SAMPLING}
    with _blame(owners_names):
        sampling = Sampling.of(temperature, top_k, top_p, min_p, seed)
        limit = default_max_tokens if max_tokens is None else max_tokens
        settings = RequestSettings(limit, stop, sampling, None, chat, logprobs)
    return settings, max_tokens is None


@contextmanager
def _blame(owners_names: dict[str, str]):
    """An owner's InvalidOptionError as a 400 naming the request's field: owners name options in
    their own words (max_new_tokens for max_tokens), and their messages begin with that name."""
    try:
        yield
    except InvalidOptionError as exc:
        message = str(exc)
        for option, field in owners_names.items():
            if message.startswith(option + " "):
                raise ApiError.invalid(field + message[len(option) :], field) from None
        raise ApiError.invalid(message) from None


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError.invalid("messages must be a non-empty list of {role, content} objects", "messages")
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


def _message(message, path: str) -> dict:
    if not isinstance(message, dict):
        raise ApiError.invalid(f"{path} must be an object with role and content", path)
    role = message.get("role")
    if role not in ROLES:
        raise ApiError.invalid(f"{path}.role must be one of {', '.join(ROLES)} (tool messages are not supported), got {_shown(role)}", f"{path}.role")
    return {"role": ROLES[role], "content": _content(message.get("content"), f"{path}.content")}


def _content(content, path: str) -> str:
    if isinstance(content, str):
        return _text(content, path)
    if isinstance(content, list) and content:
        return "\n".join(_text_part(part, f"{path}[{j}]") for j, part in enumerate(content))
    raise ApiError.invalid(f"{path} must be a string or a list of text parts", path)


def _text_part(part, path: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        raise ApiError.invalid(f'{path}: only text parts are supported ({{"type": "text", "text": ...}})', f"{path}.type")
    return _text(part.get("text"), f"{path}.text")


def _prompt(value) -> Prompt:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return _text(value, "prompt")
    if isinstance(value, list) and all(_is_integer(t) for t in value):
        try:
            return np.asarray(value, dtype=np.int64)
        except OverflowError:
            raise ApiError.invalid("prompt holds token ids too large for the vocabulary", "prompt") from None
    raise ApiError.invalid("prompt must be one prompt: a string or a list of token ids (batches are not supported)", "prompt")


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, "stop"),)
    if not isinstance(value, list):
        raise ApiError.invalid("stop must be a string or a list of strings", "stop")
    if len(value) > MAX_STOP_STRINGS:
        raise ApiError.invalid(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}", "stop")
    return tuple(_text(stop, f"stop[{i}]") for i, stop in enumerate(value))


def _text(value, path: str) -> str:
    """A string that is valid Unicode: JSON's \\ud800 escapes decode to lone surrogates, which no
    tokenizer takes."""
    if not isinstance(value, str):
        raise ApiError.invalid(f"{path} must be a string, got {_shown(value)}", path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError.invalid(f"{path} is not valid Unicode: a lone surrogate at character {exc.start}", path) from None
    return value


def _get(container: dict, name: str, kinds: tuple, what: str, default=None, path: str | None = None):
    """A field of JSON type `kinds` (true and false are not numbers), or `default` when absent or null."""
    value = container.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ApiError.invalid(f"{path or name} must be {what}, got {_shown(value)}", path or name)
    return value


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- responses -----------------------------------------------------------------------------
def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.stop_reason, "stop")


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens, "total_tokens": result.prompt_tokens + result.new_tokens}


def statistics(result: GenerationResult, drafter: str) -> dict:
    """tokenrecycle's own numbers, in an extra top-level field."""
    return {"steps": result.steps, "mean_accepted": result.mean_accepted, "drafter": drafter, "accepted_lengths": result.accepted_lengths}


STEP_COUNTS = ("steps", "tokens", "drafted")  # a chunk's extra field: what its text came from


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class Answer:
    """One request's response, or its stream of chunks, in OpenAI's shapes."""

    prefix = ""
    object_name = ""
    chunk_object = ""

    def __init__(self, model: str, pieces: TokenPieces, drafter: str, include_usage: bool = False):
        self.id = f"{self.prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.pieces, self.drafter, self.include_usage = model, pieces, drafter, include_usage
        self._unsent = dict.fromkeys(STEP_COUNTS, 0)  # steps, their tokens and accepted draft tokens not yet in a chunk

    def response(self, result: GenerationResult) -> dict:
        choice = {"index": 0, **self._whole(result), "logprobs": self._logprobs(result.logprobs), "finish_reason": finish_reason(result)}
        return {**self._envelope(self.object_name, [choice]), "usage": usage(result), "tokenrecycle": statistics(result, self.drafter)}

    def opening(self) -> list[dict]:
        return []

    def progress(self, text: str, logprobs: list[TokenLogprob] | None, tokens: int = 0, drafted: int = 0) -> list[dict]:
        """One step's chunk: its text, and in the extra field what that text came from (the
        counts of steps whose text is held back, e.g. half a character, go with the next chunk)."""
        if tokens:
            for name, count in zip(STEP_COUNTS, (1, tokens, drafted)):
                self._unsent[name] += count
        if not text and not logprobs:
            return []
        chunk = self._chunk({**self._piece(text), "logprobs": self._logprobs(logprobs), "finish_reason": None})
        chunk["tokenrecycle"], self._unsent = self._unsent, dict.fromkeys(STEP_COUNTS, 0)
        return [chunk]

    def closing(self, result: GenerationResult) -> list[dict]:
        last = self._chunk({**self._piece(""), "logprobs": None, "finish_reason": finish_reason(result)})
        last["tokenrecycle"] = statistics(result, self.drafter)
        if self.include_usage:
            return [last, {**self._envelope(self.chunk_object, []), "usage": usage(result)}]
        return [last]

    def _chunk(self, choice: dict) -> dict:
        chunk = self._envelope(self.chunk_object, [{"index": 0, **choice}])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last says usage is still to come
        return chunk

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}

    def _whole(self, result: GenerationResult) -> dict:
        raise NotImplementedError

    def _piece(self, text: str) -> dict:
        raise NotImplementedError

    def _logprobs(self, entries: list[TokenLogprob] | None):
        raise NotImplementedError


class ChatAnswer(Answer):
    prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]

    def _whole(self, result: GenerationResult) -> dict:
        return {"message": {"role": "assistant", "content": result.text, "refusal": None}}

    def _piece(self, text: str) -> dict:
        return {"delta": {"content": text} if text else {}}

    def _logprobs(self, entries: list[TokenLogprob] | None):
        if entries is None:
            return None
        return {"content": [self._entry(entry) for entry in entries], "refusal": None}

    def _entry(self, entry: TokenLogprob) -> dict:
        top = [{**self._token(token), "logprob": _logprob(lp)} for token, lp in entry.top]
        return {**self._token(entry.token), "logprob": _logprob(entry.logprob), "top_logprobs": top}

    def _token(self, token: int) -> dict:
        return {"token": self.pieces.text(token), "bytes": self.pieces.bytes(token)}


class CompletionAnswer(Answer):
    prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._offset = 0  # characters of completion text before the next token, across chunks

    def _whole(self, result: GenerationResult) -> dict:
        return {"text": result.text}

    def _piece(self, text: str) -> dict:
        return {"text": text}

    def _logprobs(self, entries: list[TokenLogprob] | None):
        if entries is None:
            return None
        texts = [self.pieces.text(entry.token) for entry in entries]
        offsets = []
        for text in texts:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [_logprob(entry.logprob) for entry in entries],
            "top_logprobs": [{self.pieces.text(token): _logprob(lp) for token, lp in entry.top} for entry in entries],
            "text_offset": offsets,
        }
