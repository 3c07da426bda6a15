"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`ApiError` is an answer with its HTTP status; `api_error_of` maps tokenrecycle's typed errors to
one (busy engine 429, too-long prompt 400 with the numbers, any other bad input 400, a stopping or
loading server 503). Anything else is a bug: `CatchAll` logs it with its traceback and answers a
500 that carries no traceback, and the server goes on serving.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import EngineBusyError, PromptTooLongError, TokenRecycleError
from .scheduler import EngineNotReadyError, EngineStoppedError

log = logging.getLogger("tokenrecycle.server")

INVALID = "invalid_request_error"
SERVER = "server_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, message, param=param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error() -> ApiError:
    return ApiError(500, "internal server error (logged on the server)", SERVER)


def api_error_of(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    """The answer for an error raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineBusyError):
        return ApiError(429, f"the server is busy: {exc}", "rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(retry_after_s)})  # fmt: skip
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineNotReadyError):
        return ApiError(503, str(exc), SERVER, code="model_not_ready")
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), SERVER, code="shutting_down")
    if isinstance(exc, TokenRecycleError):
        return ApiError.invalid(str(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return internal_error()


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Errors FastAPI and Starlette answer themselves (unknown route, wrong method, validation)
    in OpenAI's shape too."""

    async def typed(request: Request, exc: Exception) -> JSONResponse:
        return api_error_of(exc, retry_after_s).response()

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = INVALID if exc.status_code < 500 else SERVER
        return ApiError(exc.status_code, str(exc.detail), kind, code=code, headers=getattr(exc, "headers", None)).response()

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return ApiError.invalid(str(first.get("msg", "invalid request")), param).response()

    app.add_exception_handler(ApiError, typed)
    app.add_exception_handler(TokenRecycleError, typed)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)


class CatchAll:
    """ASGI middleware: an exception nothing else answered is logged and becomes a 500 in OpenAI's
    shape (when the response has not started yet); the server keeps serving. A client that left
    before its answer was sent is no error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = client_gone = False

        async def tracking_send(message):
            nonlocal started, client_gone
            started = started or message["type"] == "http.response.start"
            try:
                await send(message)
            except OSError:  # uvicorn's ClientDisconnected: the connection is closed
                client_gone = True
                raise

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if client_gone or isinstance(exc, ClientDisconnect):
                log.debug("the client left before its answer was sent: %s %s", scope.get("method"), scope.get("path"))
                return
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await internal_error().response()(scope, receive, send)
