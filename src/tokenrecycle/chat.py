"""tokenrecycle chat: a multi-turn conversation in the terminal, each answer streamed.

The conversation is a list of chat messages ({"role": "user" or "assistant", "content": ...}) that
every turn sends whole to Generator.stream, so the model's chat template sees all of it. An answer
cut short by Ctrl-C is left out of the conversation together with the question that asked for it:
a half answer would be taken as the model's last word, and a question without an answer would
leave two user turns in a row, which some chat templates refuse.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

from .errors import PromptTooLongError

RESET = "/reset"
PROMPT = "> "


@dataclass(frozen=True)
class ChatSettings:
    """What every answer of the session is decoded with (the options `generate` has too)."""

    max_new_tokens: int = 128
    stop: Sequence[str] = ()
    drafter: object | None = None  # None: the generator's own Token Recycling drafter, its table kept across turns
    sampling: object | None = None  # None: greedy


def chat_session(
    generator,
    settings: ChatSettings,
    read_line: Callable[[str], str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Answer line after line until end of input or Ctrl-C at the prompt; returns the exit code (0).
    `read_line(prompt)` returns a line or raises EOFError, as `input` does (the default)."""
    out = out or sys.stdout
    err = err or sys.stderr
    prompt = PROMPT if read_line is not None or sys.stdin.isatty() else ""  # no prompts in piped output
    read_line = read_line or terminal_reader()
    conversation: list[dict] = []
    print(f"tokenrecycle chat: {RESET} starts a new conversation, Ctrl-D ends", file=err)
    while True:
        try:
            line = read_line(prompt)
        except EOFError:  # Ctrl-D, or the end of piped input
            if prompt:
                print(file=err)
            return 0
        except KeyboardInterrupt:  # at the prompt: the user wants out
            print(file=err)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            conversation.clear()
            print("(conversation cleared)", file=err)
        elif not encodes_as_utf8(text):
            print("tokenrecycle: that line is not valid UTF-8; ignored", file=err)
        else:
            answer(generator, settings, conversation, text, out, err)


def answer(generator, settings: ChatSettings, conversation: list[dict], text: str, out: TextIO, err: TextIO) -> None:
    """Stream the answer to `text` and add the exchange to `conversation`, unless it was cut short."""
    messages = [*conversation, {"role": "user", "content": text}]
    pieces = None
    try:
        generation = generator.stream(
            messages, settings.max_new_tokens, settings.stop, drafter=settings.drafter, sampling=settings.sampling
        )
        pieces = iter(generation)
        for piece in pieces:
            out.write(piece)
            out.flush()
    except PromptTooLongError as exc:
        print(f"tokenrecycle: {exc}; {RESET} starts a new conversation", file=err)
        return
    except KeyboardInterrupt:
        if pieces is not None:
            pieces.close()  # ends the decoding loop now rather than whenever it is collected
        out.write("\n")
        out.flush()
        print("(answer interrupted: it and its question are left out of the conversation)", file=err)
        return
    out.write("\n")
    out.flush()
    result = generation.result
    if result.text.strip():
        conversation += [messages[-1], {"role": "assistant", "content": result.text}]
    else:  # an empty turn would make the next prompt invalid
        print("(empty answer: left out of the conversation)", file=err)
    print(f"[tokenrecycle] {result.stats_line()}", file=err)


def terminal_reader() -> Callable[[str], str]:
    """`input`, with line editing and history on a terminal (once readline is imported)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:  # not on every platform; input works without it
            pass
    return input


def encodes_as_utf8(text: str) -> bool:
    """Undecodable input bytes arrive as lone surrogates (surrogateescape), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
