"""`tokenrecycle serve`: the app under uvicorn, on a socket bound before the model loads.

SIGTERM is uvicorn's graceful shutdown, but first the scheduler cancels what is in flight (each
stream ends with an error event, each waiting request with a 503), so the shutdown does not wait
for long answers, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from typing import Callable

import uvicorn

from ..engine import Engine
from ..errors import InvalidOptionError
from .app import ModelInfo, create_app
from .drafting import Drafting
from .settings import ServerSettings

GRACEFUL_SHUTDOWN_S = 30  # what uvicorn waits for connections once the requests are cancelled


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        # A signal handler must not take a lock the code it interrupted may hold: stop from a thread.
        threading.Thread(target=self._on_exit, name="tokenrecycle-stop", daemon=True).start()
        if sig == signal.SIGTERM:  # handled here, not re-raised after shutdown: the exit status is 0
            self.force_exit = self.should_exit
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, so a port in use is one line and exit 2, before anything loads."""
    if not 0 <= port <= 65535:
        raise InvalidOptionError(f"--port must be from 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidOptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(load_engine: Callable[[], Engine], settings: ServerSettings, drafting: Drafting, host: str, port: int,
          on_stop: Callable[[Engine], None] | None = None, on_interval: Callable[[Engine], None] | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C; the load's error, if the model could not load, is raised.
    Meanwhile /health answers 503; one line on stderr says when the model is served, and where."""
    _log_to_stderr()
    sock = bind(host, port)
    address = _address(host, sock.getsockname()[1])
    server: _Server | None = None

    def ready(model: ModelInfo) -> None:
        print(f"tokenrecycle: serving {model.name} on {address}/v1 · {model.setup.summary()} · batching {model.setup.batching}", file=sys.stderr, flush=True)

    def failed(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load_engine, settings, drafting, on_ready=ready, on_failed=failed, on_stop=on_stop, on_interval=on_interval)
    scheduler = app.state.serving.scheduler
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = _Server(config, scheduler.shutdown)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if scheduler.load_error is not None:
        raise scheduler.load_error
    return 0


def _address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_to_stderr() -> None:
    """The server's own log (unexpected errors, with their tracebacks) on stderr."""
    logger = logging.getLogger("tokenrecycle.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tokenrecycle: %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
