"""One chat or text completion: submitted to the engine thread, then answered whole or streamed.

A client that goes away (a closed stream, or one that stops waiting) cancels its request, which
frees its slot before the engine's next step: streams check `is_disconnected` after each event
and every `disconnect_poll_s` while nothing comes, and cancel in a `finally`.
"""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Engine
from ..errors import InvalidOptionError
from .drafting import Drafting
from .errors import ApiError, api_error_of
from .http import SSE_DONE, sse
from .protocol import Answer, Generation
from .scheduler import Event, Scheduler, Submission, Submit

CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer


def prepare(engine: Engine, generation: Generation, drafting: Drafting) -> Submit:
    """On the engine thread: the prompt's ids (encoded once), the request's token budget when it
    gave none (as many as fit, up to the server's default) and its drafter."""
    try:
        ids = engine.encode(generation.prompt, generation.settings.chat)
    except InvalidOptionError as exc:  # an empty prompt, a token id the model lacks: that field's
        raise ApiError.invalid(str(exc), "messages" if isinstance(generation.prompt, list) else "prompt") from None
    settings = generation.settings
    if generation.fill:
        engine.check_fits(ids, 1)  # no room for even one token: the engine's own message
        room = engine.runner.max_context - len(ids)
        settings = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, room))
    settings = dataclasses.replace(settings, drafter=drafting.drafter_for(engine, generation.drafter))
    return Submit(ids, settings, drafting.name(generation.drafter))


async def answer(scheduler: Scheduler, http: Request, generation: Generation, drafting: Drafting,
                 reply: Answer, poll_s: float) -> Response:  # fmt: skip
    submission = await scheduler.submit(lambda engine: prepare(engine, generation, drafting))
    if generation.stream:
        return _CancellingStream(_stream(submission, http, reply, poll_s), submission)
    try:
        event = await _last_event(submission, http, poll_s)
    finally:
        submission.cancel()  # only does something when the client left
    if event is None:
        return Response(status_code=CLIENT_GONE)
    if event.error is not None:
        raise event.error
    return JSONResponse(reply.response(event.result))


class _CancellingStream(StreamingResponse):
    """A stream of events whose request is cancelled however the response ends, even when it
    never starts (the generator's own finally runs only once it has started)."""

    def __init__(self, chunks: AsyncIterator[str], submission: Submission):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.cancel()


async def _next(submission: Submission, http: Request, poll_s: float) -> Event | None:
    """The request's next event; None once the client has disconnected."""
    while True:
        event = await submission.next_event(poll_s)
        if await http.is_disconnected():
            return None
        if event is not None:
            return event


async def _last_event(submission: Submission, http: Request, poll_s: float) -> Event | None:
    while True:
        event = await _next(submission, http, poll_s)
        if event is None or event.last:
            return event


async def _stream(submission: Submission, http: Request, reply: Answer, poll_s: float) -> AsyncIterator[str]:
    try:
        for chunk in reply.opening():
            yield sse(chunk)
        while True:
            event = await _next(submission, http, poll_s)
            if event is None:
                return  # the client left: the finally below frees the slot
            if event.error is not None:
                yield sse(api_error_of(event.error).body())
                break
            for chunk in reply.progress(event.text, event.logprobs, len(event.tokens), event.drafted):
                yield sse(chunk)
            if event.result is not None:
                for chunk in reply.closing(event.result):
                    yield sse(chunk)
                break
        yield SSE_DONE
    finally:
        submission.cancel()
