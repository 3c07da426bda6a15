"""Each token id's bytes and text, as OpenAI's logprobs show them (built once from the vocabulary).

A token alone may be part of a UTF-8 character, so its text is what its bytes decode to (with
U+FFFD for a partial character) and `bytes` gives the exact bytes. Byte-level BPE vocabularies
(GPT-2 style: SmolLM2, Qwen, Llama 3) spell bytes as printable characters; SentencePiece ones
spell a space as U+2581 and raw bytes as <0xNN>.
"""

from __future__ import annotations

import re

from tokenizers import decoders

SENTENCEPIECE_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    def __init__(self, tokenizer):
        spelled = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        decode = self._byte_level if self._is_byte_level(tokenizer) else self._sentencepiece
        self._alphabet = _byte_level_alphabet()
        self._bytes = [decode(spelling or "") for spelling in spelled]
        self._text = [piece.decode("utf-8", errors="replace") for piece in self._bytes]

    def __len__(self) -> int:
        return len(self._bytes)

    def text(self, token: int) -> str:
        return self._text[token] if 0 <= token < len(self._text) else ""

    def bytes(self, token: int) -> list[int]:
        return list(self._bytes[token]) if 0 <= token < len(self._bytes) else []

    @staticmethod
    def _is_byte_level(tokenizer) -> bool:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)

    def _byte_level(self, spelling: str) -> bytes:
        if all(char in self._alphabet for char in spelling):
            return bytes(self._alphabet[char] for char in spelling)
        return spelling.encode("utf-8")  # an added token spelled in plain text

    @staticmethod
    def _sentencepiece(spelling: str) -> bytes:
        byte = _BYTE_TOKEN.fullmatch(spelling)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return spelling.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")
