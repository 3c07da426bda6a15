"""The server as a Ray Serve application: one front and N model replicas.

    Ray Serve's HTTP proxy -> Front (one, no CPU of its own) -> ModelReplica (N, an engine each)

A `ModelReplica` loads its engine once (with its share of the cores) and runs the single-process
server's FastAPI app on every request forwarded to it, so answers, errors and limits are that
server's own. Ray Serve routes each request to a replica with capacity (at most
`max_ongoing_requests` each: the engine's slots and queue, and a few more for cheap routes).
Every second a replica sends its metrics to the front.

The `Front` answers /health (ready only when every replica Ray Serve wants is running) and
/metrics (every replica's, merged, each sample labelled with its replica) itself, and forwards
every other route (forwarding.py): a request whose replica died before it answered goes to
another one; one cut mid-stream ends with an OpenAI-shaped error event. This module imports Ray:
only `tokenrecycle serve --replicas` loads it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Engine
from ..errors import EngineBusyError
from .app import ModelInfo, create_app
from .drafting import Drafting
from .errors import CatchAll, ApiError, api_error_of
from .forwarding import ForwardedRequest, relay, run_app, send_error
from .http import check_api_key, read_body
from .metrics import CONTENT_TYPE, MergedMetrics, ReplicaReport
from .scheduler import EngineNotReadyError
from .settings import ServerSettings

log = logging.getLogger("tokenrecycle.server")

APP_NAME = "tokenrecycle"
FRONT, MODEL = "Front", "ModelReplica"
REPORT_EVERY_S = 1.0  # how often a replica sends its metrics to the front
REPORT_MAX_AGE_S = 3 * REPORT_EVERY_S  # a replica not heard from for this long is gone from /metrics
RETRIES = 2  # a request whose replica is lost before answering is sent again, this many times
CHEAP_ROUTES_MARGIN = 8  # requests past slots + queue a replica takes: /v1/models, /tokenize, 429s
FRONT_MAX_ONGOING = 4096  # the front only relays: it must never be what queues requests
READY_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})  # every wanted replica serves
REPLICA_HEADER = b"x-tokenrecycle-replica"
LOST = (RayActorError,)  # the replica's process died or cannot be reached


@dataclass(frozen=True)
class ReplicaSpec:
    """What every model replica is built from (pickled to each by Ray)."""

    load_engine: Callable[[], Engine]
    settings: ServerSettings
    drafting: Drafting
    threads: int
    on_stop: Callable[[Engine], None] | None = None
    on_interval: Callable[[Engine], None] | None = None


class ModelReplica:
    """One engine, served by the single-process app, one forwarded request at a time per call."""

    async def __init__(self, spec: ReplicaSpec):
        torch.set_num_threads(spec.threads)
        context = serve.get_replica_context()
        self.replica, self.threads = context.replica_id.unique_id, spec.threads
        self.node = ray.util.get_node_ip_address()
        self.model = await self._load(spec)
        self.headers = ((REPLICA_HEADER, self.replica.encode()),)
        self.front = serve.get_deployment_handle(FRONT, context.app_name)
        self.reporter = asyncio.get_running_loop().create_task(self._report_metrics())

    async def _load(self, spec: ReplicaSpec) -> ModelInfo:
        """The app, started as uvicorn would start it; returns once its engine has loaded (a
        replica counts as running only then), or raises what the load raised."""
        loaded: list[ModelInfo] = []
        done = threading.Event()

        def ready(model: ModelInfo) -> None:
            loaded.append(model)
            done.set()

        self.app = create_app(spec.load_engine, spec.settings, spec.drafting, on_ready=ready,
                              on_failed=lambda exc: done.set(), on_stop=spec.on_stop, on_interval=spec.on_interval)  # fmt: skip
        self.serving = self.app.state.serving
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        await asyncio.to_thread(done.wait)
        if not loaded:
            await self.lifespan.__aexit__(None, None, None)
            raise self.serving.scheduler.load_error
        return loaded[0]

    async def forward(self, request: ForwardedRequest):
        """The app's ASGI messages for one request (the front streams them on)."""
        async for message in run_app(self.app, request, self.headers):
            yield message

    def describe(self) -> dict:
        setup = self.model.setup
        return {"model": self.model.name, "summary": setup.summary(), "batching": setup.batching, "threads": self.threads}

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose engine stopped is replaced."""
        self.serving.scheduler.check_ready()

    async def _report_metrics(self) -> None:
        registry = self.serving.metrics.registry
        while True:
            report = ReplicaReport(self.replica, os.getpid(), self.node, self.threads, list(registry.collect()), time.time())
            try:
                await self.front.report.remote(report)
            except Exception as exc:  # the front restarting: the next report gets there
                log.debug("metrics report failed: %s", exc)
            await asyncio.sleep(REPORT_EVERY_S)

    async def __del__(self):
        """Ray Serve's graceful stop, once in-flight requests drained (or its timeout passed):
        what still runs is cancelled with an error event, as the single-process server does."""
        if hasattr(self, "reporter"):  # not when its load failed: that stopped the app already
            self.reporter.cancel()
            await self.lifespan.__aexit__(None, None, None)


@serve.ingress()
class Front:
    """Ray Serve's ingress: /health and /metrics here, every other route relayed to a replica."""

    def __init__(self, model, settings: ServerSettings, threads: int):
        self.model_stream = model.options(stream=True)
        self.settings, self.threads = settings, threads
        self.metrics = MergedMetrics(REPORT_MAX_AGE_S)

    def __serve_build_asgi_app__(self):
        return CatchAll(self._route)

    def report(self, report: ReplicaReport) -> None:
        self.metrics.update(report)

    async def _route(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        local = {"/health": self._health, "/metrics": self._metrics}.get(scope["path"])
        if local is None:
            return await self._forward(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            return await send_error(send, ApiError(405, "Method Not Allowed", code="method_not_allowed"))
        try:
            response = await local(Request(scope, receive))
        except Exception as exc:
            response = api_error_of(exc, self.settings.retry_after_s).response()
        await response(scope, receive, send)

    async def _health(self, request: Request) -> Response:
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[APP_NAME].deployments[MODEL]
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        running = states.get("RUNNING", 0)
        status_name = str(getattr(deployment.status, "value", deployment.status))
        if status_name not in READY_STATES or running == 0:
            waiting = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items())) or "none yet"
            raise EngineNotReadyError(f"replicas not ready ({status_name.lower()}): {waiting}")
        reporting = [{"id": r.replica, "node": r.node, "pid": r.pid, "threads": r.threads} for r in self.metrics.current()]
        return JSONResponse({"status": "ok", "replicas": {"running": running, "threads": self.threads, "reporting": reporting}})

    async def _metrics(self, request: Request) -> Response:
        check_api_key(request, self.settings.api_key)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _forward(self, scope, receive, send) -> None:
        try:
            body = await read_body(Request(scope, receive), self.settings.max_body_bytes)
        except ApiError as exc:
            return await send_error(send, exc)
        request = ForwardedRequest.of(scope, body)
        try:
            outcome = await relay(lambda: self.model_stream.forward.remote(request), send, LOST, RETRIES)
        except BackPressureError:  # every replica is full and so is Ray's queue in front of them
            return await send_error(send, api_error_of(EngineBusyError("every replica is busy"), self.settings.retry_after_s))
        self.metrics.retries.inc(outcome.retries)
        if outcome.cut:
            self.metrics.cut.inc()


async def _lifespan(receive, send) -> None:
    """The front holds nothing to start or stop: the ASGI lifespan protocol, acknowledged."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def application(spec: ReplicaSpec, replicas: int, autoscaling: dict | None, max_waiting: int, max_slots: int):
    """The bound application: the front over `replicas` model replicas (or autoscaled ones)."""
    capacity = max_slots + max_waiting + CHEAP_ROUTES_MARGIN
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    model = serve.deployment(ModelReplica, name=MODEL).options(
        ray_actor_options={"num_cpus": spec.threads}, max_ongoing_requests=capacity,
        max_queued_requests=capacity, max_constructor_retry_count=2, graceful_shutdown_timeout_s=10, **scaling,
    )  # fmt: skip
    front = serve.deployment(Front, name=FRONT).options(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=FRONT_MAX_ONGOING)
    return front.bind(model.bind(spec), spec.settings, spec.threads)


__all__ = ["APP_NAME", "FRONT", "MODEL", "REPLICA_HEADER", "Front", "ModelReplica", "ReplicaSpec", "application"]
