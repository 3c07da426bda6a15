"""HTTP details the routes share: the body as JSON within a size limit, the API key, SSE framing."""

from __future__ import annotations

import hmac
import json

from fastapi import Request

from .errors import ApiError

DRAIN_FACTOR = 16  # an oversized body is read to its end (up to this many limits) so the 413 arrives


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 above `limit` bytes, 400 when it is not a JSON object."""
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError.invalid(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError.invalid("the body must be a JSON object")
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 above `limit` bytes (read on to its end, up to a bound, so the
    client finishes sending and reads the answer)."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > limit
        if too_large:
            # Reading on lets the client finish sending and read the 413; past this, stop reading.
            if size > DRAIN_FACTOR * limit:
                break
            continue
        chunks.append(chunk)
    if too_large:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    return b"".join(chunks)


def check_api_key(request: Request, key: str | None) -> None:
    """`Authorization: Bearer KEY`, compared in constant time; no key set: anyone may call."""
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_raw(given.strip()), _raw(key)):
        raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
