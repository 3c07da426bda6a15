"""One thread owns the engine; the server's event loop talks to it through an inbox.

The engine is not thread-safe, so exactly one thread loads it and then calls submit, step and
cancel. The event loop posts commands (a function of the engine) to a thread-safe inbox; the
engine thread drains the inbox between steps, steps while any request is waiting or running, and
sleeps on a condition otherwise. What a command returns, or raises, comes back to the awaiting
coroutine through `loop.call_soon_threadsafe`; so does each request's progress, one `Event` per
step into that request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import Engine
from ..errors import TokenRecycleError
from ..prompts import Prompt
from ..request import GenerationResult, Request, RequestSettings, TokenLogprob, Update

log = logging.getLogger("tokenrecycle.server")


class EngineNotReadyError(TokenRecycleError):
    """The model is still loading, or failed to load."""


class EngineStoppedError(TokenRecycleError):
    """The server is shutting down: nothing new starts and what runs is cancelled."""


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # the load raised: `load_error`
    STOPPED = "stopped"


@dataclass(frozen=True)
class Submit:
    """What to hand the engine for one request; `label` names its drafter for the statistics."""

    prompt: Prompt
    settings: RequestSettings
    label: str = ""


@dataclass(frozen=True)
class Event:
    """One step's progress of one request. The last event has `result` (it ended) or `error`."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    drafted: int = 0  # how many of `tokens` were accepted draft tokens (the rest: the model's own)

    @property
    def last(self) -> bool:
        return self.result is not None or self.error is not None


class EngineObserver:
    """What the engine thread reports as it works (metrics implement it); every call comes from
    the engine thread, between steps."""

    def submitted(self, request: Request) -> None: ...

    def stepped(self, updates: list[Update]) -> None: ...

    def ended(self, request: Request, label: str) -> None: ...

    def idle(self, engine: Engine) -> None: ...  # after each round of commands and steps


@dataclass
class _Command:
    run: Callable[[Engine], None]
    fail: Callable[[BaseException], None]


@dataclass
class _Tracked:
    deliver: Callable[[Event], None]
    label: str


class Scheduler:
    def __init__(
        self,
        load: Callable[[], Engine],
        observer: EngineObserver | None = None,
        on_ready: Callable[[Engine], None] | None = None,
        on_failed: Callable[[BaseException], None] | None = None,
        on_stop: Callable[[Engine], None] | None = None,
    ):
        """`load` builds the engine on the engine thread; `on_ready` runs there before the first
        command (what it raises counts as a failed load), `on_stop` after the last."""
        self._load = load
        self._observer = observer or EngineObserver()
        self._on_ready, self._on_failed, self._on_stop = on_ready, on_failed, on_stop
        self._inbox: deque[_Command] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._tracked: dict[Request, _Tracked] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None

    # ---- the event loop's side -----------------------------------------------------------
    def start(self) -> None:
        """Load the engine on its own thread, then serve the inbox there."""
        self._thread = threading.Thread(target=self._main, name="tokenrecycle-engine", daemon=True)
        self._thread.start()

    def check_ready(self) -> None:
        if self.state is EngineState.READY and not self._stopping:
            return
        if self.state is EngineState.LOADING:
            raise EngineNotReadyError("Loading model")
        if self.state is EngineState.FAILED:
            raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
        raise EngineStoppedError("the server is shutting down")

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """fn(engine) run on the engine thread, between steps; its result or its exception."""
        return await self._post_call(fn)

    async def submit(self, prepare: Callable[[Engine], Submit]) -> Submission:
        """Submit a request built by prepare(engine) on the engine thread; errors from either
        (a bad option, a prompt too long, a full queue) are raised here."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def start(engine: Engine) -> Request:
            ask = prepare(engine)
            request = engine.submit(ask.prompt, ask.settings)
            self._tracked[request] = _Tracked(lambda event: self._to_loop(loop, events.put_nowait, event), ask.label)
            self._observe("submitted", request)
            return request

        future = self._post_call(start)
        try:
            request = await asyncio.shield(future)
        except asyncio.CancelledError:  # the caller went away: cancel the request it would have had
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self.cancel(f.result()))
            raise
        return Submission(self, request, events)

    async def call_every(self, seconds: float, fn: Callable[[Engine], Any]) -> None:
        """fn(engine) on the engine thread every `seconds`, between steps, until the engine stops
        (or its load failed); run as a task, cancelled to end it."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self._post_call(fn)
            except TokenRecycleError:  # stopping, or never loaded: nothing more to do
                return
            except Exception:
                log.exception("the periodic hook failed")

    def cancel(self, request: Request) -> None:
        """End a request and free its slot now (before the next step)."""
        self._post(_Command(lambda engine: self._cancel(engine, request), lambda exc: None))

    def shutdown(self) -> None:
        """Stop: cancel what is in flight (each gets an EngineStoppedError), refuse what comes.
        Safe from any thread, but not from a signal handler (it takes a lock)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _post_call(self, fn: Callable[[Engine], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run(engine: Engine) -> None:
            try:
                value = fn(engine)
            except BaseException as exc:
                self._to_loop(loop, _settle, future, None, exc)
            else:
                self._to_loop(loop, _settle, future, value, None)

        self._post(_Command(run, lambda exc: self._to_loop(loop, _settle, future, None, exc)))
        return future

    def _post(self, command: _Command) -> None:
        with self._wake:
            if not self._stopping and self.state is not EngineState.FAILED:
                self._inbox.append(command)
                self._wake.notify()
                return
        command.fail(self._refusal())

    def _refusal(self) -> TokenRecycleError:
        if self.state is EngineState.FAILED:
            return EngineNotReadyError(f"the model failed to load: {self.load_error}")
        return EngineStoppedError("the server is shutting down")

    @staticmethod
    def _to_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    # ---- the engine thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            engine = self._load()
            if self._on_ready is not None:
                self._on_ready(engine)
        except BaseException as exc:
            self._fail_load(exc)
            return
        self.state = EngineState.READY
        try:
            self._serve(engine)
        finally:
            self._stop(engine)

    def _fail_load(self, exc: BaseException) -> None:
        if not isinstance(exc, TokenRecycleError):
            log.error("the model failed to load", exc_info=exc)
        with self._wake:
            self.load_error, self.state = exc, EngineState.FAILED
            waiting = list(self._inbox)
            self._inbox.clear()
        for command in waiting:
            command.fail(self._refusal())
        if self._on_failed is not None:
            self._on_failed(exc)

    def _serve(self, engine: Engine) -> None:
        while True:
            commands = self._next_commands(busy=not engine.idle)
            if commands is None:
                return
            for command in commands:
                self._run(engine, command)
            if not engine.idle:
                self._step(engine)
            self._observe("idle", engine)

    @staticmethod
    def _run(engine: Engine, command: _Command) -> None:
        try:
            command.run(engine)
        except Exception:  # commands report their own errors; this is a bug, not a reason to stop serving
            log.exception("a command on the engine thread failed")

    def _observe(self, what: str, *args) -> None:
        """Tell the observer; its failure is logged, never a reason to stop serving."""
        try:
            getattr(self._observer, what)(*args)
        except Exception:
            log.exception("the engine observer failed in %s", what)

    def _next_commands(self, busy: bool) -> list[_Command] | None:
        """What the inbox holds (waiting for something while the engine has nothing to do);
        None once stopping."""
        with self._wake:
            while not self._inbox and not self._stopping and not busy:
                self._wake.wait()
            if self._stopping:
                return None
            commands = list(self._inbox)
            self._inbox.clear()
            return commands

    def _step(self, engine: Engine) -> None:
        try:
            updates = engine.step()
        except Exception as exc:  # a fault outside any one request: end them all, keep serving
            log.exception("an engine step failed; ending the requests in flight")
            self._end_all(engine, exc)
            return
        self._observe("stepped", updates)
        for update in updates:
            self._deliver(update)

    def _deliver(self, update: Update) -> None:
        request = update.request
        tracked = self._tracked.get(request)
        if update.finished:
            self._tracked.pop(request, None)
            self._observe("ended", request, tracked.label if tracked else "")
        if tracked is None:
            return
        if update.finished and request.error is not None:
            tracked.deliver(Event(error=request.error))
            return
        result = request.result if update.finished else None
        tracked.deliver(Event(update.text, list(update.tokens), update.logprobs, result, drafted=_drafted(update)))

    def _cancel(self, engine: Engine, request: Request) -> None:
        tracked = self._tracked.pop(request, None)
        if tracked is None or request.finished:
            return
        request.cancel()
        engine.drop_cancelled()
        self._observe("ended", request, tracked.label)
        tracked.deliver(Event(result=request.result))

    def _end_all(self, engine: Engine, error: BaseException) -> None:
        ending = list(self._tracked.items())
        self._tracked.clear()
        for request, _ in ending:
            request.cancel()
        try:
            engine.drop_cancelled()
        except Exception:
            log.exception("could not free the slots of the requests in flight")
        for request, tracked in ending:
            self._observe("ended", request, tracked.label)
            tracked.deliver(Event(error=error))

    def _stop(self, engine: Engine) -> None:
        with self._wake:
            self._stopping = True
            waiting = list(self._inbox)
            self._inbox.clear()
        for command in waiting:
            command.fail(self._refusal())
        self._end_all(engine, EngineStoppedError("the server is shutting down"))
        self._observe("idle", engine)
        self.state = EngineState.STOPPED
        if self._on_stop is not None:
            try:
                self._on_stop(engine)
            except Exception:
                log.exception("the shutdown hook failed")


def _drafted(update: Update) -> int:
    """A step's tokens are its accepted draft tokens, then the model's own (bonus) token; a stop
    keeps only the first ones. The prefill drafts nothing."""
    step = update.step
    if step is None or step.tree is None:
        return 0
    return min(len(update.tokens), len(step.tokens) - 1)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Submission:
    """A submitted request as the event loop sees it: its events, and a cancel that frees its slot."""

    def __init__(self, scheduler: Scheduler, request: Request, events: asyncio.Queue):
        self.scheduler, self.request, self.events = scheduler, request, events
        self.ended = False

    async def next_event(self, timeout: float) -> Event | None:
        """The next event, or None when none came within `timeout` seconds."""
        try:
            event = await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None
        self.ended = self.ended or event.last
        return event

    def cancel(self) -> None:
        """Cancel the request unless it has ended (then nothing is left to free)."""
        if not self.ended:
            self.ended = True
            self.scheduler.cancel(self.request)
