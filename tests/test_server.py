"""tokenrecycle serve: the real server (uvicorn, in a subprocess) on a tiny random Llama with
SmolLM2's tokenizer (float32), through the official openai client and raw HTTP.

Greedy answers equal the engine's own (alone and among other requests); seeded samples repeat;
logprobs are the model's log_softmax; every error is OpenAI-shaped and the next request succeeds;
a client that leaves mid-stream frees its slot; a bounded load test adds up in /metrics; SIGTERM
ends the process with 0. A few checks run the app in-process (loading, an unexpected exception).
Everything talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tokenrecycle import Engine, RequestSettings
from tokenrecycle.drafters.registry import DEFAULT_DRAFTER
from tokenrecycle.sampling import Sampling
from tokenrecycle.server import ServerSettings, create_app
from tokenrecycle.server.tokens import TokenPieces
from serving import KEY, MODEL, ServerProcess, metric, model_dir, sse_events, wait_for  # noqa: F401
from tiny_models import one_thread  # noqa: F401

SLOTS, QUEUE = 4, 4
BODY_LIMIT = 100_000
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
PROMPTS = ["The quick brown fox", "Once upon a time", "def reverse(s):", "Rain in Spain", "1, 2, 3, 4,"]


# ---- the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    running = ServerProcess(model_dir, log, "--max-slots", str(SLOTS), "--queue", str(QUEUE), "--max-body-bytes", str(BODY_LIMIT))
    yield running
    assert running.stop() == 0, log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace")  # no error here was unexpected, disconnects included


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(timeout=30, trust_env=False) as transport:
        yield OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, http_client=transport)


@pytest.fixture(scope="module")
def engine(model_dir):
    """The same model in this process: what every greedy answer must equal."""
    return Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)


@pytest.fixture(scope="module")
def pieces(engine):
    return TokenPieces(engine.tokenizer)


def extra(model, name: str = "tokenrecycle"):
    return (model.model_extra or {})[name]


# ---- answers -------------------------------------------------------------------------------
def test_health_models_and_metrics(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and extra(models[0], "max_model_len") == 1024
    text = http.get("/metrics").text
    for name in ("tokenrecycle_requests_total", "tokenrecycle_queue_length", "tokenrecycle_active_slots", "tokenrecycle_time_to_first_token_seconds_bucket"):
        assert name in text


def test_greedy_chat_equals_the_engine(client, engine):
    expected = engine.complete(CHAT, RequestSettings(16))
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=16)
    choice = answer.choices[0]
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.stop_reason == "length" else "stop")
    assert answer.usage.completion_tokens == expected.new_tokens and answer.usage.prompt_tokens == expected.prompt_tokens
    stats = extra(answer)
    assert stats["drafter"] == DEFAULT_DRAFTER and sum(stats["accepted_lengths"]) == expected.new_tokens
    assert stats["steps"] == len(stats["accepted_lengths"]) and stats["mean_accepted"] >= 1


def test_greedy_completion_equals_the_engine_from_text_and_token_ids(client, engine):
    expected = engine.complete(PROMPTS[0], RequestSettings(12, chat=False))
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=12)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert answer.choices[0].text == expected.text and answer.usage.completion_tokens == expected.new_tokens
    ids = engine.encode(PROMPTS[1], chat=False)
    expected = engine.complete(ids, RequestSettings(12))
    answer = client.completions.create(model=MODEL, prompt=ids.tolist(), temperature=0, max_tokens=12)
    assert answer.choices[0].text == expected.text and answer.usage.prompt_tokens == len(ids)


def test_streamed_chat_has_openais_shape_and_the_whole_answer(http, client, engine):
    expected = engine.complete(CHAT, RequestSettings(20))
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and all(c["usage"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == expected.text
    assert finish["choices"][0]["finish_reason"] in ("stop", "length") and finish["choices"][0]["delta"] == {}
    assert sum(finish["tokenrecycle"]["accepted_lengths"]) == expected.new_tokens  # the split depends on the drafts
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == expected.new_tokens
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=20, stream=True) if c.choices]
    assert "".join(pieces) == expected.text


def test_streamed_completion(client, engine):
    expected = engine.complete(PROMPTS[2], RequestSettings(10, chat=False))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and extra(chunks[-1])["steps"] >= 1


def test_stop_strings_and_max_tokens(client, engine):
    whole = engine.complete(PROMPTS[3], RequestSettings(24, chat=False)).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    expected = engine.complete(PROMPTS[3], RequestSettings(24, stop=[stop, "never-seen"], chat=False))
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[3], temperature=0, max_tokens=24, stop=[stop, "never-seen"])
    assert answer.choices[0].text == expected.text and stop not in answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    assert short.choices[0].finish_reason == ("length" if short.usage.completion_tokens == 3 else "stop")


@pytest.mark.parametrize("prompt_tokens, expected_tokens", [(900, 1024 - 900), (20, 512)])
def test_without_max_tokens_a_request_gets_what_fits_up_to_the_default(client, engine, prompt_tokens, expected_tokens):
    ids = list(range(1000, 1000 + prompt_tokens))
    expected = engine.complete(np.array(ids), RequestSettings(expected_tokens))
    answer = client.completions.create(model=MODEL, prompt=ids, temperature=0)
    assert answer.usage.completion_tokens == expected.new_tokens and answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == ("length" if expected.stop_reason == "length" else "stop")


def test_seeded_samples_repeat_and_equal_the_engines(client, engine):
    ask = dict(model=MODEL, messages=CHAT, temperature=0.9, top_p=0.95, max_tokens=16)
    first = client.chat.completions.create(**ask, seed=11).choices[0].message.content
    again = client.chat.completions.create(**ask, seed=11).choices[0].message.content
    expected = engine.complete(CHAT, RequestSettings(16, sampling=Sampling(0.9, top_k=0, top_p=0.95, seed=11)))
    assert first == again == expected.text
    others = {client.chat.completions.create(**ask, seed=seed).choices[0].message.content for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_logprobs_are_the_models_own(client, engine, pieces):
    import torch

    expected = engine.complete(CHAT, RequestSettings(8))
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    ids = engine.encode(CHAT)
    with torch.inference_mode():
        logits = engine.loaded.model(torch.tensor([ids.tolist() + expected.token_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 :]
    content = answer.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for row, token, entry in zip(logp, expected.token_ids, content):
        assert entry.token == pieces.text(token) and entry.bytes == pieces.bytes(token)
        assert abs(entry.logprob - float(row[token])) < 1e-4
        assert [t.token for t in entry.top_logprobs] == [pieces.text(t) for t in torch.topk(row, 3).indices.tolist()]
    expected = engine.complete(PROMPTS[4], RequestSettings(6, chat=False, logprobs=2))
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[4], temperature=0, max_tokens=6, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [pieces.text(entry.token) for entry in expected.logprobs]
    assert np.allclose(logprobs.token_logprobs, [entry.logprob for entry in expected.logprobs], atol=1e-4)
    assert [list(top) for top in logprobs.top_logprobs] == [[pieces.text(t) for t, _ in entry.top] for entry in expected.logprobs]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_byte_level_pieces_are_the_exact_bytes(pieces, engine):
    word = "naïve ☃"
    ids = engine.tokenizer(word)["input_ids"]
    assert b"".join(bytes(pieces.bytes(t)) for t in ids) == word.encode("utf-8")


def test_greedy_answers_are_exact_among_other_requests(client, engine):
    expected = [engine.complete(p, RequestSettings(14, chat=False)).text for p in PROMPTS]

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=14).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS, timeout=60))
    assert answers == expected


def test_tokenize_and_detokenize(http, engine):
    ids = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert ids["tokens"] == engine.encode(PROMPTS[0], chat=False).tolist() and ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 1024
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == engine.encode(CHAT).tolist()
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": engine.tokenizer.decode(ids["tokens"])}
    assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


# ---- errors, each followed by a request that succeeds ----------------------------------------
def chat_body(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


ERRORS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", ', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("wrong type", "/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature"),
    ("negative temperature", "/v1/chat/completions", chat_body(temperature=-1), 400, "temperature"),
    ("zero max_tokens", "/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("top_p out of range", "/v1/chat/completions", chat_body(top_p=2), 400, "top_p"),
    ("n above 1", "/v1/chat/completions", chat_body(n=2), 400, "n"),
    ("presence penalty", "/v1/chat/completions", chat_body(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency penalty", "/v1/chat/completions", chat_body(frequency_penalty=-1), 400, "frequency_penalty"),
    ("logit bias", "/v1/chat/completions", chat_body(logit_bias={"5": 10}), 400, "logit_bias"),
    ("five stop strings", "/v1/chat/completions", chat_body(stop=list("abcde")), 400, "stop"),
    ("empty stop string", "/v1/chat/completions", chat_body(stop=[""]), 400, "stop"),
    ("too many top logprobs", "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top logprobs alone", "/v1/chat/completions", chat_body(top_logprobs=2), 400, "top_logprobs"),
    ("tool role", "/v1/chat/completions", chat_body(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    ("image part", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages[0].content[0].type"),
    ("unknown drafter", "/v1/chat/completions", chat_body(drafter="psychic"), 400, None),
    ("draft model without one", "/v1/chat/completions", chat_body(drafter="draft-model"), 400, None),
    ("unknown model", "/v1/chat/completions", chat_body(model="gpt-4"), 404, "model"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("batch of prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("token id outside the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
    ("echo", "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("unknown route", "/v1/embeddings", {"model": MODEL}, 404, None),
]


def assert_openai_error(response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_next_request_succeeds(http):
    response = http.post("/v1/chat/completions", json=chat_body(max_tokens=2, temperature=0))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("name, path, body, status, param", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_openai_shaped(http, name, path, body, status, param):
    sent = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert_openai_error(sent, status, param)
    assert_next_request_succeeds(http)


def test_lone_surrogate_is_refused_naming_the_field(http):
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    error = assert_openai_error(http.post("/v1/chat/completions", content=raw), 400, "messages[0].content")
    assert "surrogate" in error["message"]
    raw = b'{"model": "tiny", "max_tokens": 2, "prompt": "ok", "stop": ["\\udfff"]}'
    assert_openai_error(http.post("/v1/completions", content=raw), 400, "stop[0]")
    assert_next_request_succeeds(http)


def test_prompt_too_long_says_the_numbers(http):
    error = assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 1000, "max_tokens": 100}), 400)
    assert "1000" in error["message"] and "1024" in error["message"] and error["code"] == "context_length_exceeded"
    error = assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 1024}), 400)
    assert "1024" in error["message"]
    assert_next_request_succeeds(http)


def test_body_over_the_limit_is_413(http):
    body = chat_body(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}])
    assert_openai_error(http.post("/v1/chat/completions", json=body), 413)
    assert_next_request_succeeds(http)


def test_api_key_is_needed_except_for_health(server, http):
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as anonymous:
        assert anonymous.get("/health").status_code == 200
        error = assert_openai_error(anonymous.post("/v1/chat/completions", json=chat_body()), 401)
        assert error["code"] == "invalid_api_key"
        wrong = anonymous.post("/v1/completions", json={"model": MODEL, "prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401)
        assert_openai_error(anonymous.get("/metrics"), 401)
    assert_next_request_succeeds(http)


def long_stream(http, stack: ExitStack, seed: int, max_tokens: int = 900):
    """An open streamed request that would run long (sampled, so no early loop on a random model)."""
    body = {"model": MODEL, "prompt": "count", "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True}
    response = stack.enter_context(http.stream("POST", "/v1/completions", json=body))
    assert response.status_code == 200
    return response


def test_a_full_queue_is_429_with_retry_after(http):
    with ExitStack() as stack:
        for seed in range(SLOTS + QUEUE):
            long_stream(http, stack, seed)
        busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
        error = assert_openai_error(busy, 429)
        assert busy.headers["retry-after"] == "1" and error["type"] == "rate_limit_error"
    assert wait_for(lambda: metric(http, "tokenrecycle_active_slots") == 0 and metric(http, "tokenrecycle_queue_length") == 0)
    assert_next_request_succeeds(http)


def test_a_client_that_leaves_mid_stream_frees_its_slot(http, client, engine):
    expected = engine.complete(CHAT, RequestSettings(60))
    generated_before = metric(http, "tokenrecycle_generated_tokens_total")
    other = {}

    def streamed_neighbour():
        chunks = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=60, stream=True)
        other["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ExitStack() as stack:
        leaving = long_stream(http, stack, seed=5, max_tokens=1000)
        neighbour = threading.Thread(target=streamed_neighbour)
        neighbour.start()
        lines = leaving.iter_lines()
        for _ in range(6):  # a few chunks, then hang up
            next(lines)
    assert wait_for(lambda: metric(http, "tokenrecycle_active_slots") <= 1, timeout=5)
    neighbour.join(60)
    assert other["text"] == expected.text
    assert wait_for(lambda: metric(http, "tokenrecycle_active_slots") == 0, timeout=5)
    generated = metric(http, "tokenrecycle_generated_tokens_total") - generated_before
    assert generated - expected.new_tokens < 900  # the leaver was cut short, far from its 1000 tokens


def test_a_client_that_stops_waiting_for_a_whole_answer_frees_its_slot(server, http):
    generated_before = metric(http, "tokenrecycle_generated_tokens_total")
    body = {"model": MODEL, "prompt": "count", "max_tokens": 1000, "temperature": 1.0, "seed": 8}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5, trust_env=False) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    assert wait_for(lambda: metric(http, "tokenrecycle_active_slots") == 0, timeout=5)
    assert metric(http, "tokenrecycle_generated_tokens_total") - generated_before < 900
    assert_next_request_succeeds(http)


def test_bounded_load_adds_up_in_metrics(http, client):
    label = 'endpoint="/v1/chat/completions"'
    before = metric(http, "tokenrecycle_requests_total", label)
    sent, concurrency = 40, 8

    def ask(i: int) -> str:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Request {i}"}],
                                                    max_tokens=8, temperature=0.7, seed=i, timeout=60)  # fmt: skip
        except Exception as exc:  # a clear error (429 when the queue is full) is an answer too
            status = getattr(exc, "status_code", None)
            assert status == 429, exc
            return "busy"
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
        return "ok"

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(ask, range(sent), timeout=120))
    assert time.monotonic() - started < 120 and outcomes.count("ok") >= sent // 2
    assert metric(http, "tokenrecycle_requests_total", label) - before == sent
    assert metric(http, "tokenrecycle_forward_passes_total") > 0 and metric(http, "tokenrecycle_prompt_tokens_total") > 0


# ---- in-process: loading, an unexpected exception; the command line ---------------------------
def test_health_is_503_while_the_model_loads():
    from fastapi.testclient import TestClient

    loaded = threading.Event()

    def slow_load():
        loaded.wait(10)
        raise RuntimeError("not today")

    app = create_app(slow_load, ServerSettings(served_model_name=MODEL))
    with TestClient(app) as local:
        error = assert_openai_error(local.get("/health"), 503)
        assert error["message"] == "Loading model"
        assert_openai_error(local.post("/v1/chat/completions", json=chat_body()), 503)
        loaded.set()
        assert wait_for(lambda: "failed to load" in local.get("/health").text)


def test_an_unexpected_exception_is_a_500_and_the_server_goes_on(model_dir):
    """A bug before the request starts (here in encoding) and one inside a step (here its drafter):
    OpenAI-shaped 500s (in a stream: an error event), nothing of the traceback sent, and the next
    request is answered."""
    from fastapi.testclient import TestClient

    from tokenrecycle.drafters.lookup import LookupDrafter

    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)
    encode, build_drafter = engine.encode, engine.build_drafter
    engine.encode = lambda prompt, chat=None: (_ for _ in ()).throw(RuntimeError("boom")) if prompt == "boom" else encode(prompt, chat)

    def broken_lookup(name, **options):
        if name != "lookup":
            return build_drafter(name, **options)
        drafter = LookupDrafter()
        drafter.propose = lambda root: (_ for _ in ()).throw(RuntimeError("drafter broke"))
        return drafter

    engine.build_drafter = broken_lookup
    app = create_app(lambda: engine, ServerSettings(served_model_name=MODEL))
    ask = {"model": MODEL, "prompt": "fine", "max_tokens": 4}
    with TestClient(app, raise_server_exceptions=False) as local:
        assert wait_for(lambda: local.get("/health").status_code == 200)
        error = assert_openai_error(local.post("/v1/completions", json={**ask, "prompt": "boom"}), 500)
        assert error["type"] == "server_error" and "boom" not in error["message"]
        error = assert_openai_error(local.post("/v1/completions", json={**ask, "drafter": "lookup"}), 500)
        assert "broke" not in error["message"]
        with local.stream("POST", "/v1/completions", json={**ask, "drafter": "lookup", "stream": True}) as streamed:
            events = sse_events(streamed)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error" and "broke" not in json.dumps(events)
        fine = local.post("/v1/completions", json=ask)
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "options, text",
    [
        (["--queue", "-1"], "max_waiting"),
        (["--max-slots", "0"], "max_slots"),
        (["--port", "70000"], "--port"),
        (["--stop", "x"], "per request"),
        (["--draft", "int4", "--drafter", "lookup"], "exclude each other"),
    ],
)
def test_bad_serve_options_are_one_line_and_exit_2(capsys, monkeypatch, model_dir, options, text):
    from tokenrecycle.cli import main

    monkeypatch.setattr("tokenrecycle.runners.native.native_module_built", lambda: True)  # no build notice here

    code = main(["serve", "--model", model_dir, "--dtype", "float32", "--tree", "tr4", "--port", "0", *options])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tokenrecycle: error:") and text in lines[0], err


def test_the_table_is_saved_while_serving_when_it_changed(model_dir, tmp_path):
    """on_interval (the CLI gives it the table's save) runs every save_every_s between steps, and
    on_stop once at the end."""
    from fastapi.testclient import TestClient

    from tokenrecycle.tables import TableFile

    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)
    tables, stops = TableFile(str(tmp_path / "table.npz")), []
    settings = ServerSettings(served_model_name=MODEL, save_every_s=0.05)
    tables.load(engine)  # as the CLI's serving_engine does: none there yet
    app = create_app(lambda: engine, settings, on_interval=tables.save, on_stop=stops.append)
    with TestClient(app) as local:
        assert wait_for(lambda: local.get("/health").status_code == 200)
        time.sleep(0.2)
        assert not tables.path(engine).exists()  # nothing learned yet: nothing written
        assert local.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 4}).status_code == 200
        assert wait_for(lambda: tables.path(engine).is_file())
    assert stops == [engine]


def test_sigterm_cancels_what_is_in_flight_and_exits_0(model_dir, tmp_path):
    """SIGTERM: the stream in flight ends with an error event, the process exits 0, and the table
    it learned is saved (--table)."""
    table = tmp_path / "table.npz"
    server = ServerProcess(model_dir, tmp_path / "server.log", "--max-slots", "1", "--table", str(table))
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, trust_env=False) as local:
            with ExitStack() as stack:
                streaming = long_stream(local, stack, seed=1, max_tokens=1000)
                lines = streaming.iter_lines()
                next(lines)
                server.process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
        assert server.process.wait(20) == 0
        with np.load(table, allow_pickle=False) as saved:
            assert (saved["table"] >= 0).any()
    finally:
        server.stop()
