"""tokenrecycle serve --replicas: the server's replicas on Ray Serve.

First the parts without Ray: forwarding a request through a replica's app and relaying its answer
(retried when the replica is lost before answering, an error event when lost mid-stream), the
merged metrics, the replica settings and the command's one-line errors. Then a real local Ray
cluster on 127.0.0.1, started and stopped by these tests: two replicas on a tiny random Llama
(float32) answer 20 concurrent requests from the openai client exactly as the single-process
server does, both take requests, bad input gets the same OpenAI errors, and when one replica's
process is killed mid-run the other keeps serving, Ray restarts it, every request ends within a
bounded time, and no process is left behind once the server stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from serving import KEY, MODEL, ServerProcess, metric, model_dir, sse_events, wait_for  # noqa: F401
from test_server import CHAT, ERRORS, PROMPTS, chat_body
from tiny_models import one_thread  # noqa: F401
from tokenrecycle.errors import InvalidOptionError
from tokenrecycle.server.forwarding import ForwardedRequest, relay, run_app
from tokenrecycle.server.metrics import MergedMetrics, Metrics, ReplicaReport
from tokenrecycle.server.settings import ReplicaSettings


# ---- forwarding and relaying, without Ray ----------------------------------------------------
class Lost(Exception):
    """Stands for Ray's RayActorError: the replica's process died."""


class FakeStream:
    """A replica's messages; raises Lost after `lose_after` of them (None: never)."""

    def __init__(self, messages, lose_after=None):
        self.messages, self.lose_after, self.cancelled = messages, lose_after, False

    async def __aiter__(self):
        for count, message in enumerate(self.messages):
            if count == self.lose_after:
                raise Lost()
            yield message
        if self.lose_after is not None and self.lose_after >= len(self.messages):
            raise Lost()

    def cancel(self):
        self.cancelled = True


def answer(status=200, chunks=(b'{"ok": 1}',), content_type=b"application/json"):
    start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
    bodies = [{"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)]
    return [start, *bodies]


def relayed(streams, retries=2):
    sent, opened = [], []

    def open_stream():
        opened.append(streams[len(opened)])
        return opened[-1]

    async def send(message):
        sent.append(message)

    outcome = asyncio.run(relay(open_stream, send, (Lost,), retries))
    return outcome, sent, opened


def body_of(sent) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_an_answer_is_relayed_as_it_came():
    outcome, sent, opened = relayed([FakeStream(answer(chunks=(b"a", b"b")))])
    assert sent == answer(chunks=(b"a", b"b")) and outcome.retries == 0 and not outcome.cut and opened[0].cancelled


def test_a_replica_lost_before_its_answer_is_retried_on_another():
    outcome, sent, opened = relayed([FakeStream(answer(), lose_after=1), FakeStream(answer(), lose_after=0), FakeStream(answer())])
    assert sent == answer() and outcome.retries == 2 and len(opened) == 3 and all(s.cancelled for s in opened)


def test_replicas_lost_past_the_retries_are_a_503_in_openais_shape():
    outcome, sent, _ = relayed([FakeStream(answer(), lose_after=0)] * 3, retries=2)
    assert sent[0]["status"] == 503 and json.loads(body_of(sent))["error"]["code"] == "replica_unavailable"
    assert (b"retry-after", b"1") in sent[0]["headers"] and outcome.retries == 2


def test_a_stream_cut_mid_answer_ends_with_an_error_event_and_done():
    stream = answer(chunks=(b"data: {}\n\n", b"data: {}\n\n"), content_type=b"text/event-stream; charset=utf-8")
    outcome, sent, opened = relayed([FakeStream(stream, lose_after=2)])
    assert outcome.cut and len(opened) == 1  # started: never sent twice
    events = [line for line in body_of(sent).decode().split("\n\n") if line]
    assert events[0] == "data: {}" and json.loads(events[1][len("data: "):])["error"]["code"] == "replica_unavailable"
    assert events[2] == "data: [DONE]" and sent[-1]["more_body"] is False


def test_a_replica_runs_the_app_and_tells_it_when_the_client_left():
    seen = {}

    async def app(scope, receive, send):
        seen["scope"], seen["body"] = scope, (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        seen["then"] = await receive()  # what the app sees once its client has left

    async def run():
        request = ForwardedRequest("POST", "/v1/completions", b"q=1", ((b"host", b"h"),), b"{}", ("1.2.3.4", 5))
        messages = run_app(app, request, ((b"x-replica", b"r1"),))
        start = await messages.__anext__()
        await messages.__anext__()
        await messages.aclose()  # the front's client left
        return start

    start = asyncio.run(run())
    assert start["headers"] == [(b"a", b"1"), (b"x-replica", b"r1")] and seen["body"] == b"{}"
    assert seen["scope"]["path"] == "/v1/completions" and seen["scope"]["query_string"] == b"q=1"
    assert seen["scope"]["headers"] == [(b"host", b"h")] and seen["then"] == {"type": "http.disconnect"}


def test_body_chunks_waiting_together_travel_as_one_message():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def run():
        return [m async for m in run_app(app, ForwardedRequest("GET", "/", b"", (), b""))]

    start, body = asyncio.run(run())
    assert start["status"] == 200 and body == {"type": "http.response.body", "body": b"abc", "more_body": False}


def test_merged_metrics_label_every_sample_with_its_replica_and_drop_the_silent():
    merged = MergedMetrics(max_age_s=60)
    for replica, count in (("r1", 3), ("r2", 5)):
        metrics = Metrics()
        metrics.generated_tokens.inc(count)
        metrics.count_request("/v1/completions", 200)
        merged.update(ReplicaReport(replica, 1, "node", 1, list(metrics.registry.collect()), time.time()))
    text = merged.render().decode()
    assert 'tokenrecycle_generated_tokens_total{replica="r1"} 3.0' in text and 'tokenrecycle_generated_tokens_total{replica="r2"} 5.0' in text
    assert 'tokenrecycle_requests_total{endpoint="/v1/completions",replica="r1",status="200"} 1.0' in text
    assert text.count("# TYPE tokenrecycle_generated_tokens_total counter") == 1 and "tokenrecycle_replicas_reporting 2.0" in text
    merged.max_age_s = 0
    assert "replica=" not in merged.render().decode()


# ---- settings and the command's errors -------------------------------------------------------
def test_threads_share_the_cores_among_the_most_replicas_there_may_be():
    assert ReplicaSettings(replicas=2).threads_per_replica(8) == 4 and ReplicaSettings(replicas=3).threads_per_replica(2) == 1
    assert ReplicaSettings(replicas=2, threads=3).threads_per_replica(8) == 3
    scaled = ReplicaSettings(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=3)
    assert scaled.threads_per_replica(8) == 2
    assert scaled.autoscaling_config() == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 3}
    assert ReplicaSettings(replicas=2).autoscaling_config() is None


@pytest.mark.parametrize(
    "options, text",
    [
        (["--replicas", "0"], "--replicas"),
        (["--replicas", "2", "--threads", "0"], "--threads"),
        (["--threads", "-1"], "--threads"),
        (["--replicas", "5", "--max-replicas", "4"], "between"),
        (["--replicas", "2", "--target-ongoing-requests", "0"], "--target-ongoing-requests"),
        (["--ray-address", " "], "--ray-address"),
    ],
)
def test_bad_replica_options_are_one_line_and_exit_2(capsys, model_dir, options, text):
    from tokenrecycle.cli import main

    code = main(["serve", "--model", model_dir, "--dtype", "float32", "--tree", "tr4", "--port", "0", *options])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tokenrecycle: error:") and text in lines[0], lines


def test_without_ray_replicas_say_what_to_install(capsys, monkeypatch, model_dir):
    from tokenrecycle.cli import main

    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code = main(["serve", "--model", model_dir, "--dtype", "float32", "--tree", "tr4", "--replicas", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install 'tokenrecycle[ray]'" in lines[0], lines


# ---- a local Ray cluster: two replicas against the single-process server ------------------------
STOP_TIMEOUT_S = 60
REQUESTS = 20


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    running = ServerProcess(model_dir, tmp_path_factory.mktemp("single") / "server.log")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    pytest.importorskip("ray", reason="Ray Serve is the optional extra tokenrecycle[ray] (make install installs it)")
    log = tmp_path_factory.mktemp("replicas") / "server.log"
    running = ServerProcess(model_dir, log, "--replicas", "2")
    running.spawned = descendants(running.process.pid)
    yield running
    spawned = running.spawned | descendants(running.process.pid)
    assert running.stop(STOP_TIMEOUT_S) == 0, log.read_text(errors="replace")
    assert wait_for(lambda: not any(alive(pid) for pid in spawned), timeout=30), [pid for pid in spawned if alive(pid)]


def client_of(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, http_client=httpx.Client(timeout=60, trust_env=False))


def http_of(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, trust_env=False)


def ask(client: OpenAI, i: int):
    """Request i of a mixed load: chats and text completions of several lengths, greedy."""
    if i % 2:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT[: 2 + i % 3], temperature=0, max_tokens=8 + i)
        return raw.headers.get("x-tokenrecycle-replica"), raw.parse().choices[0].message.content
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], temperature=0, max_tokens=8 + i)
    return raw.headers.get("x-tokenrecycle-replica"), raw.parse().choices[0].text


def test_the_ready_line_and_health_name_the_replicas_and_their_threads(cluster):
    line = next(line for line in cluster.log.read_text().splitlines() if "serving" in line)
    assert "2 replicas x 1 thread on Ray" in line and "local" in line
    with http_of(cluster) as http:
        assert wait_for(lambda: len(http.get("/health").json().get("replicas", {}).get("reporting", [])) == 2, timeout=10)
        health = http.get("/health").json()
    assert health["status"] == "ok" and health["replicas"]["running"] == 2 and health["replicas"]["threads"] == 1
    assert all(replica["pid"] in descendants(cluster.process.pid) for replica in health["replicas"]["reporting"])


def test_two_replicas_answer_concurrent_requests_as_the_single_process_server(cluster, single):
    with ThreadPoolExecutor(REQUESTS) as pool:
        on_ray = list(pool.map(lambda i: ask(client_of(cluster), i), range(REQUESTS)))
    alone = [ask(client_of(single), i)[1] for i in range(REQUESTS)]
    assert [text for _, text in on_ray] == alone
    assert len({replica for replica, _ in on_ray}) == 2  # both replicas took requests
    with http_of(cluster) as http:  # and both count theirs, each under its own label
        counted = lambda: metric(http, "tokenrecycle_requests_total", 'status="200"')  # noqa: E731
        assert wait_for(lambda: counted() >= REQUESTS, timeout=10)
        text = http.get("/metrics").text
    assert len({line.split('replica="')[1].split('"')[0] for line in text.splitlines() if line.startswith("tokenrecycle_generated_tokens_total")}) == 2


def test_a_stream_through_the_front_is_the_single_process_servers(cluster, single):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 12, "stream": True}
    texts = []
    for server in (cluster, single):
        with http_of(server) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        texts.append("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]))
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("name, path, body, status, param", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_gets_the_single_process_servers_error(cluster, single, name, path, body, status, param):
    answers = []
    for server in (cluster, single):
        with http_of(server) as http:
            sent = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
        answers.append((sent.status_code, sent.json()))
    assert answers[0] == answers[1] and answers[0][0] == status


def test_limits_and_keys_hold_through_the_front(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30, trust_env=False) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/v1/models").status_code == 401
    with http_of(cluster) as http:
        big = chat_body(messages=[{"role": "user", "content": "x" * (5 * 2**20)}])
        assert http.post("/v1/chat/completions", json=big).json()["error"]["code"] == "request_too_large"
        assert http.post("/health").json()["error"]["code"] == "method_not_allowed"
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_a_killed_replica_is_replaced_while_the_other_serves(cluster):
    """Runs last against the cluster: its replicas change here."""
    with http_of(cluster) as http:
        before = {r["id"]: r["pid"] for r in http.get("/health").json()["replicas"]["reporting"]}
        victim = min(before)
        assert before[victim] in descendants(cluster.process.pid)  # a process this test started

        def request(i: int):
            body = {"model": MODEL, "prompt": f"Count {i}", "max_tokens": 200, "temperature": 1.0, "seed": i, "stream": i % 2 == 0}
            started = time.monotonic()
            with http_of(cluster) as own, own.stream("POST", "/v1/completions", json=body) as response:
                events = sse_events(response) if body["stream"] else [json.loads(response.read())]
            return response.status_code, events, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            running = [pool.submit(request, i) for i in range(8)]
            time.sleep(1.0)
            os.kill(before[victim], signal.SIGKILL)
            ended = [future.result(timeout=120) for future in running]
        for status, events, seconds in ended:  # an answer, or a clear error: nothing hangs
            assert seconds < 120
            if status == 200 and events[-1] == "[DONE]" and "error" in events[-2]:
                assert events[-2]["error"]["code"] == "replica_unavailable"
            elif status == 200:
                assert events[-1] == "[DONE]" or events[0]["choices"]
            else:
                assert status == 503 and events[0]["error"]["code"] == "replica_unavailable"
        survivor = http.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 4})
        assert survivor.status_code == 200

        def replaced() -> bool:
            health = http.get("/health")
            ids = [r["id"] for r in health.json().get("replicas", {}).get("reporting", [])] if health.status_code == 200 else []
            return len(ids) == 2 and victim not in ids

        assert wait_for(replaced, timeout=120, every=1.0), http.get("/health").text
        cluster.spawned |= descendants(cluster.process.pid)
