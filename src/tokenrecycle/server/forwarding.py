"""One HTTP request forwarded from the front to a model replica, and its answer relayed back.

With replicas (replicas.py), Ray Serve's proxy hands every request to the front, which reads it
whole (`ForwardedRequest`) and passes it to a model replica. The replica runs the same FastAPI app
as the single-process server on it (`run_app`) and streams the app's ASGI messages back, so that
answers and errors are the single-process server's own. The front sends them on (`relay`),
holding the response's start until its first body bytes: a replica lost before then is retried on
another with nothing sent twice, and a stream cut later ends with an OpenAI-shaped error event.
Nothing here imports Ray: the stream and the errors that mean a lost replica are given.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol

from .errors import SERVER, ApiError
from .http import SSE_DONE, sse

APP_DRAIN_S = 5.0  # what a replica waits for the app to end its request once its client has left
Headers = tuple[tuple[bytes, bytes], ...]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class ForwardedRequest:
    """What a replica needs of an HTTP request to run it through its app: picklable, body read."""

    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None

    @classmethod
    def of(cls, scope: dict, body: bytes) -> ForwardedRequest:
        headers = tuple((bytes(name), bytes(value)) for name, value in scope.get("headers", ()))
        client = tuple(scope["client"]) if scope.get("client") else None
        return cls(scope["method"], scope["path"], scope.get("query_string", b""), headers, body, client)

    def scope(self) -> dict:
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
            "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
            "client": self.client, "server": None,
        }  # fmt: skip


async def run_app(app, request: ForwardedRequest, extra_headers: Headers = ()) -> AsyncIterator[dict]:
    """The app's ASGI messages for one request, `extra_headers` added to the response's start.
    Closing the iterator early (the front's client left) tells the app its client disconnected,
    as uvicorn would, so the request is cancelled and its slot freed."""
    outbox = _Outbox()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", ()), *extra_headers]}
        outbox.put(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: outbox.put(None))
    try:
        while (message := await outbox.next()) is not None:
            yield message
        task.result()  # what the app raised (its CatchAll answers everything: a bug if so)
    finally:
        if not task.done():
            disconnected.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), APP_DRAIN_S)
            except BaseException:  # it did not end in time, or this task is cancelled again
                task.cancel()


class _Outbox:
    """The app's messages in order; None ends them. `next` joins a body message with the body
    messages already waiting behind it: when the front falls behind a fast stream, one hop
    carries several chunks instead of one each (every hop costs CPU the model's steps need)."""

    def __init__(self):
        self._messages: deque[dict | None] = deque()
        self._arrived = asyncio.Event()

    def put(self, message: dict | None) -> None:
        self._messages.append(message)
        self._arrived.set()

    async def next(self) -> dict | None:
        while not self._messages:
            self._arrived.clear()
            await self._arrived.wait()
        message = self._messages.popleft()
        if message is None or message["type"] != "http.response.body":
            return message
        body = [message.get("body", b"")]
        while message.get("more_body", False) and self._messages and _is_body(self._messages[0]):
            message = self._messages.popleft()
            body.append(message.get("body", b""))
        return {"type": "http.response.body", "body": b"".join(body), "more_body": message.get("more_body", False)}


def _is_body(message: dict | None) -> bool:
    return message is not None and message["type"] == "http.response.body"


class ReplicaStream(Protocol):
    """One forwarded request's messages from a replica (Ray's DeploymentResponseGenerator)."""

    def __aiter__(self) -> AsyncIterator[dict]: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class RelayOutcome:
    """How a relayed request went: `retries` replicas lost before anything was sent, `cut` when a
    replica was lost after its answer had started (the client got an error in its place)."""

    retries: int = 0
    cut: bool = False


def replica_lost_error() -> ApiError:
    return ApiError(503, "the replica serving this request stopped before it could answer; try again",
                    SERVER, code="replica_unavailable", headers={"Retry-After": "1"})  # fmt: skip


async def relay(open_stream: Callable[[], ReplicaStream], send: Send, lost: tuple[type[BaseException], ...],
                retries: int) -> RelayOutcome:  # fmt: skip
    """Send a replica's answer on. A replica lost (an exception in `lost`) before the first body
    bytes: the request is opened again, up to `retries` times, then answered 503; lost later: a
    streamed answer ends with an error event and [DONE], any other is cut short."""
    for attempt in range(retries + 1):
        stream = open_stream()
        held: list[dict] | None = []  # the response's start, until its first body message
        event_stream = False
        try:
            async for message in stream:
                if held is None:
                    await send(message)
                    continue
                held.append(message)
                if message["type"] == "http.response.start":
                    event_stream = _is_event_stream(message)
                elif message["type"] == "http.response.body":
                    for waiting in held:
                        await send(waiting)
                    held = None
            return RelayOutcome(attempt)
        except lost:
            if held is not None and attempt < retries:
                continue
            if held is not None:
                await send_error(send, replica_lost_error())
                return RelayOutcome(attempt)
            await _end_cut_answer(send, event_stream)
            return RelayOutcome(attempt, cut=True)
        finally:
            stream.cancel()  # nothing when it ended; otherwise the replica stops working on it
    raise AssertionError("unreachable")


async def send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _end_cut_answer(send: Send, event_stream: bool) -> None:
    """A replica lost mid-answer: a stream gets the error as its last event; other bodies end."""
    tail = (sse(replica_lost_error().body()) + SSE_DONE).encode() if event_stream else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})


def _is_event_stream(start: dict) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in start.get("headers", ()))


__all__ = ["ForwardedRequest", "RelayOutcome", "ReplicaStream", "relay", "replica_lost_error", "run_app", "send_error"]
