"""From decided tokens to finished text: EOS, max_new_tokens, stop strings and streaming pieces."""

from __future__ import annotations

from typing import Sequence

from .errors import InvalidOptionError


def check_stop_strings(stop_strings: str | Sequence[str]) -> list[str]:
    """Stop strings as a list; an empty one would match before the first token."""
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if any(not isinstance(stop, str) or not stop for stop in stops):
        raise InvalidOptionError("a stop string must be a non-empty string (an empty one matches before the first token)")
    return stops


class OutputAssembler:
    """Takes tokens as the loop decides them; says when to stop and what text is safe to show.

    Token ids end with the token that triggered the stop (EOS, or the one completing a stop
    string), as in transformers; the text never shows EOS or the stop string itself. Text is held
    back while it could still be the start of a stop string or an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop_strings: Sequence[str], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop_strings = check_stop_strings(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self._shown = 0

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def add(self, tokens: Sequence[int]) -> str:
        """Append tokens up to the first stop; return the newly showable text."""
        for token in tokens:
            self.tokens.append(int(token))
            self.stop_reason = self._stop_reason_after(int(token))
            if self.done:
                break
        self.text = self._visible_text()
        return self._take_showable()

    def _stop_reason_after(self, token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        # Checked token by token: a stop string may be completed by any token of a step.
        if self.stop_strings and self._find_stop(self._decode()) is not None:
            return "stop"
        if len(self.tokens) >= self.max_new_tokens:
            return "length"
        return None

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _visible_text(self) -> str:
        text = self._decode()
        cut = self._find_stop(text)
        return text if cut is None else text[:cut]

    def _find_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _take_showable(self) -> str:
        end = len(self.text) if self.done else self._safe_end()
        piece = self.text[self._shown : end]
        self._shown = max(self._shown, end)
        return piece

    def _safe_end(self) -> int:
        """End of the text that can be shown now: no half character, no possible stop start."""
        end = len(self.text)
        while end > 0 and self.text[end - 1] == "\ufffd":
            end -= 1
        held = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - size : end] == stop[:size]:
                    held = max(held, size)
                    break
        return end - held
