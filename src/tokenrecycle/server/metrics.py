"""Prometheus metrics, in a registry of the app's own (never the process-wide one), prefix tokenrecycle_.

`Metrics` is the engine thread's observer (steps, drafts, requests' timings, queue and slots)
and counts HTTP requests by endpoint and status through the `CountRequests` middleware.
With replicas, each replica reports its `Metrics` to the front (`ReplicaReport`), whose one
/metrics route merges them, every sample labelled with its replica (`MergedMetrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from ..engine import Engine
from ..request import Request, RequestState, Update
from .scheduler import EngineObserver

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics(EngineObserver):
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenrecycle_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tokenrecycle_prompt_tokens", "prompt tokens of the requests submitted to the engine", registry=r)
        self.generated_tokens = Counter("tokenrecycle_generated_tokens", "tokens generated", registry=r)
        self.forward_passes = Counter("tokenrecycle_forward_passes", "target-model forward passes (prefills included)", registry=r)
        self.draft_offered = Counter("tokenrecycle_draft_tokens_offered", "draft tokens verified (tree nodes below the root)", registry=r)
        self.draft_accepted = Counter("tokenrecycle_draft_tokens_accepted", "draft tokens accepted", registry=r)
        self.accepted_by_position = Counter("tokenrecycle_accepted_tokens_by_position", "accepted draft tokens by depth in the tree (1: the first draft token)", ["position"], registry=r)
        self.drafter_plays = Counter("tokenrecycle_drafter_plays", "drafting steps by drafter (auto and merged: by the arm played)", ["drafter"], registry=r)
        self.queue_length = Gauge("tokenrecycle_queue_length", "requests waiting for a slot", registry=r)
        self.active_slots = Gauge("tokenrecycle_active_slots", "requests running, each on a KV-cache slot", registry=r)
        self.kv_cache_bytes = Gauge("tokenrecycle_kv_cache_bytes", "memory held by the KV caches of every slot", registry=r)
        self.kv_cache_tokens = Gauge("tokenrecycle_kv_cache_tokens", "tokens cached for the running requests", registry=r)
        self.time_to_first_token = Histogram("tokenrecycle_time_to_first_token_seconds", "from submission to the first token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("tokenrecycle_time_per_output_token_seconds", "after the first token, per token", buckets=TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("tokenrecycle_request_latency_seconds", "from submission to the last token", buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    # ---- the engine thread's observer ----------------------------------------------------
    def submitted(self, request: Request) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))

    def stepped(self, updates: list[Update]) -> None:
        for update in updates:
            step = update.step
            if step is None:  # the request failed in this step
                continue
            self.forward_passes.inc()
            self.generated_tokens.inc(len(update.tokens))
            if step.tree is not None:
                accepted = len(step.tokens) - 1  # the last token is the model's own (bonus)
                self.draft_offered.inc(len(step.tree) - 1)
                self.draft_accepted.inc(accepted)
                for position in range(1, accepted + 1):
                    self.accepted_by_position.labels(position=str(position)).inc()

    def ended(self, request: Request, label: str) -> None:
        self._count_plays(request, label)
        if request.state is not RequestState.FINISHED or request.first_token_at is None:
            return
        tokens = len(request.assembler.tokens)
        self.time_to_first_token.observe(request.first_token_at - request.submitted)
        self.request_latency.observe(request.ended - request.submitted)
        if tokens > 1:
            self.time_per_output_token.observe((request.ended - request.first_token_at) / (tokens - 1))

    def _count_plays(self, request: Request, label: str) -> None:
        drafter = request.drafter
        arms = getattr(drafter, "arm_names", None)
        if arms is not None:  # several drafters behind one: which mix drafted each step
            for arm, plays in zip(arms, drafter.plays):
                if plays:
                    self.drafter_plays.labels(drafter=f"{label}:{arm}").inc(plays)
            return
        drafting_steps = max(len(request.accepted_lengths) - 1, 0)  # every step after the prefill
        if drafting_steps:
            self.drafter_plays.labels(drafter=label or type(drafter).__name__).inc(drafting_steps)

    def idle(self, engine: Engine) -> None:
        running = engine.running
        self.queue_length.set(len(engine.waiting))
        self.active_slots.set(len(running))
        self.kv_cache_bytes.set(engine.runner.cache_bytes)
        self.kv_cache_tokens.set(sum(engine.runner.cache_length(r.slot) for r in running if r.slot is not None))


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's metrics as it sends them to the front, with where it runs."""

    replica: str
    pid: int
    node: str
    threads: int
    families: list[Metric]
    sent_at: float  # time.time() on the replica


class MergedMetrics:
    """The front's /metrics: its own counters and, for each replica that reported within
    `max_age_s`, that replica's families, every sample with a `replica` label."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.retries = Counter("tokenrecycle_replica_retries", "requests sent again to another replica: theirs was lost before answering", registry=r)
        self.cut = Counter("tokenrecycle_replica_cut_answers", "answers cut short by a replica lost after they had started", registry=r)
        self.reporting = Gauge("tokenrecycle_replicas_reporting", "replicas whose metrics are current", registry=r)
        self.registry.register(self)

    def update(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (time.monotonic(), report)

    def current(self) -> list[ReplicaReport]:
        """The replicas heard from lately (a dead one drops out), by id."""
        now = time.monotonic()
        for replica, (heard, _) in list(self._reports.items()):
            if now - heard > self.max_age_s:
                del self._reports[replica]
        return [report for _, report in sorted(self._reports.values(), key=lambda item: item[1].replica)]

    def collect(self):
        """Prometheus's collector protocol: one family per name, the replicas' samples merged."""
        merged: dict[str, Metric] = {}
        for report in self.current():
            for family in report.families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    into.samples.append(Sample(sample.name, {**sample.labels, "replica": report.replica}, *sample[2:]))
        return list(merged.values())

    def render(self) -> bytes:
        self.reporting.set(len(self.current()))
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: each HTTP request counted once, by endpoint and status, as its last byte is
    sent (so a client that has its answer sees it counted)."""

    def __init__(self, app, metrics: Metrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status, counted = 500, False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.count_request(endpoint, status)

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            count()  # a response cut short (the client left mid-stream) counts too
