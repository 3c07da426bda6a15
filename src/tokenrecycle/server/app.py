"""The FastAPI app: OpenAI's chat and text completions, models, health, metrics, tokenize, and the chat page.

`create_app` builds an app that holds all its state (`app.state.serving`): the scheduler whose
thread loads and owns the engine, the metrics, the settings. The engine loads in the background
when the app starts, so /health answers 503 "Loading model" until it is ready.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from ..engine import Engine, Setup
from .completions import answer
from .drafting import Drafting
from .errors import CatchAll, api_error_of, install_error_handlers
from .http import check_api_key, read_json
from .metrics import CONTENT_TYPE, CountRequests, Metrics
from .protocol import ChatAnswer, CompletionAnswer, check_model, check_token_ids, parse_chat, parse_completion, parse_detokenize, parse_tokenize
from .scheduler import Scheduler
from .settings import ServerSettings
from .tokens import TokenPieces

SHUTDOWN_WAIT_S = 30.0  # for the engine thread to finish its step and stop
CHAT_PAGE = resources.files(__package__).joinpath("static", "index.html")
# The page fetches nothing but this server's API: no other origin, no plugins, no framing.
CHAT_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"})


@dataclass(frozen=True)
class ModelInfo:
    """What the routes need from the loaded engine, read once on the engine thread."""

    name: str
    max_context: int
    vocab_size: int
    pieces: TokenPieces
    setup: Setup
    loaded_at: int


class Serving:
    """The app's state: settings, drafting, metrics, the scheduler and, once loaded, the model."""

    def __init__(self, load_engine: Callable[[], Engine], settings: ServerSettings, drafting: Drafting,
                 on_ready=None, on_failed=None, on_stop=None):  # fmt: skip
        self.settings, self.drafting = settings, drafting
        self.metrics = Metrics()
        self.model: ModelInfo | None = None
        self._on_ready = on_ready
        self.scheduler = Scheduler(load_engine, self.metrics, self._ready, on_failed, on_stop)

    def _ready(self, engine: Engine) -> None:
        setup = engine.describe(self.drafting.default)
        name = self.settings.served_model_name or setup.model
        pieces = TokenPieces(engine.tokenizer)
        self.model = ModelInfo(name, engine.runner.max_context, engine.runner.vocab_size, pieces, setup, int(time.time()))
        if self._on_ready is not None:
            self._on_ready(self.model)

    def ready_model(self) -> ModelInfo:
        self.scheduler.check_ready()
        return self.model


def create_app(load_engine: Callable[[], Engine], settings: ServerSettings | None = None, drafting: Drafting | None = None, *,
               on_ready: Callable[[ModelInfo], None] | None = None, on_failed: Callable[[BaseException], None] | None = None,
               on_stop: Callable[[Engine], None] | None = None, on_interval: Callable[[Engine], None] | None = None) -> FastAPI:  # fmt: skip
    """The server app. `load_engine` runs on the engine thread when the app starts; `on_ready`
    and `on_stop` run there too (after the load, after the last request), and `on_interval`
    every `settings.save_every_s` seconds between steps (the table's periodic save); `on_failed`
    when the load raised."""
    settings = settings or ServerSettings()
    serving = Serving(load_engine, settings, drafting or Drafting(), on_ready, on_failed, on_stop)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.scheduler.start()
        periodic = asyncio.create_task(serving.scheduler.call_every(settings.save_every_s, on_interval)) if on_interval else None
        try:
            yield
        finally:
            if periodic is not None:
                periodic.cancel()  # before the stop: on_stop, after the last request, is the last call
            serving.scheduler.shutdown()
            await asyncio.to_thread(serving.scheduler.join, SHUTDOWN_WAIT_S)

    app = FastAPI(title="tokenrecycle", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(CatchAll)
    app.add_middleware(CountRequests, metrics=serving.metrics, endpoints=ENDPOINTS)

    def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    guarded = [Depends(authorized)]
    page = CHAT_PAGE.read_bytes()

    @app.get("/")
    async def chat_page():
        """The chat page, static: no key is needed to load it (it asks for one when the API does)."""
        headers = {"Content-Security-Policy": CHAT_PAGE_POLICY, "Cache-Control": "no-cache"}
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/health")
    async def health():
        try:
            serving.scheduler.check_ready()
        except Exception as exc:
            return api_error_of(exc).response()
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        model = serving.ready_model()
        card = {"id": model.name, "object": "model", "created": model.loaded_at, "owned_by": "tokenrecycle", "max_model_len": model.max_context}
        return {"object": "list", "data": [card]}

    async def model_and_body(request: Request, model_required: bool):
        """The ready model and the request's JSON body, whose `model` (required or not) must name it."""
        model = serving.ready_model()
        body = await read_json(request, settings.max_body_bytes)
        if model_required or body.get("model") is not None:
            check_model(body, model.name)
        return model, body

    async def generate(request: Request, parse, reply_class):
        """Chat and text completions differ only in how the body is read and the answer shaped."""
        model, body = await model_and_body(request, model_required=True)
        generation = parse(body, settings.default_max_tokens)
        reply = reply_class(model.name, model.pieces, serving.drafting.name(generation.drafter), generation.include_usage)
        return await answer(serving.scheduler, request, generation, serving.drafting, reply, settings.disconnect_poll_s)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        return await generate(request, parse_chat, ChatAnswer)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        return await generate(request, parse_completion, CompletionAnswer)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request):
        model, body = await model_and_body(request, model_required=False)
        prompt, chat = parse_tokenize(body)
        ids = await serving.scheduler.call(lambda engine: engine.encode(prompt, chat).tolist())
        return {"tokens": ids, "count": len(ids), "max_model_len": model.max_context}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: Request):
        model, body = await model_and_body(request, model_required=False)
        tokens = parse_detokenize(body)
        check_token_ids(tokens, model.vocab_size, "tokens")
        text = await serving.scheduler.call(lambda engine: engine.tokenizer.decode(tokens))
        return {"prompt": text}

    return app


__all__ = ["create_app", "ModelInfo", "Serving"]
