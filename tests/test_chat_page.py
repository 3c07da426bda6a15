"""The chat page at / in headless Chromium (Debian's package), driven over Chromium's DevTools
protocol as a person would: type the API key, a prompt, click Send, wait for the streamed answer.

The page's answer and its shaded pieces equal what a plain streaming client gets (the text of the
chunks whose `tokenrecycle.drafted` is above 0); a second turn sends the history; Stop cancels the
request on the server. A screenshot of the page goes to docs/chat-page.png, rewritten only when
the page or its conversation changed (the signature in the PNG says which). Without Chromium the
browser tests skip; the stream's per-chunk counts are checked all the same. Everything talks to
127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serving import KEY, MODEL, ServerProcess, metric, model_dir, sse_events, wait_for  # noqa: F401
from tiny_models import one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "src" / "tokenrecycle" / "server" / "static" / "index.html"
SCREENSHOT = ROOT / "docs" / "chat-page.png"
SIGNATURE_KEY = "tokenrecycle-page"  # a PNG text chunk: what the screenshot shows
WIDTH, HEIGHT = 1000, 700
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server", "--hide-scrollbars",
                  "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}"]  # fmt: skip
BROWSER_START_S = 20
ANSWER_S = 30
PROMPTS = ["Why is the sky blue?", "And at sunset?"]
MAX_TOKENS = 64


def chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


# ---- the server, and what a plain client gets ------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("page-log") / "server.log"
    running = ServerProcess(model_dir, log, "--max-slots", "2")
    yield running
    assert running.stop() == 0, log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace")  # the stopped request included


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, trust_env=False) as client:
        yield client


def streamed(http, messages: list[dict]) -> list:
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        return sse_events(response)


def content_chunks(events: list) -> list[dict]:
    return [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]


def test_the_page_is_served_with_no_key_and_fetches_nothing_else(server):
    page = httpx.get(f"{server.url}/", timeout=10, trust_env=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == PAGE.read_bytes()
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    for outside in ("http://", "https://", "//cdn", "@import", "innerHTML", "insertAdjacentHTML", "document.write"):
        assert outside not in page.text, outside


def test_stream_chunks_say_how_many_of_their_tokens_were_accepted_drafts(http):
    events = streamed(http, [{"role": "user", "content": PROMPTS[0]}])
    assert events[-1] == "[DONE]"
    chunks, finish, usage = content_chunks(events), events[-3], events[-2]
    counts = [c["tokenrecycle"] for c in chunks]
    assert all(set(c) == {"steps", "tokens", "drafted"} and c["steps"] >= 1 and 0 <= c["drafted"] < c["tokens"] for c in counts)
    lengths = finish["tokenrecycle"]["accepted_lengths"]
    sent = sum(c["tokens"] for c in counts)
    held_back = sum(lengths) - sent  # tokens of a last step whose text never came (none here, usually)
    assert 0 <= held_back and sum(c["steps"] for c in counts) <= len(lengths) == finish["tokenrecycle"]["steps"]
    # The prefill drafts nothing; each later step is its accepted drafts and the model's own token.
    drafted = sum(n - 1 for n in lengths[1:])
    assert drafted - sum(c["drafted"] for c in counts) in range(0, held_back + 2)
    assert usage["usage"]["completion_tokens"] == sum(lengths)


# ---- Chromium over its DevTools protocol -----------------------------------------------------
class Browser:
    """Headless Chromium in a new session (its process group is its pid), one page, a fresh profile."""

    def __init__(self, executable: str, profile: Path, log: Path):
        websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[test]')")
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)  # fmt: skip
        try:
            port = self._wait_for_port(profile / "DevToolsActivePort")
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5, trust_env=False).json()
            page = next(t for t in targets if t["type"] == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        except BaseException:
            self.stop()
            raise
        self.calls = 0

    def _wait_for_port(self, path: Path) -> int:
        deadline = time.monotonic() + BROWSER_START_S
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"Chromium did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def call(self, method: str, **params):
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events (none asked for) and answers to earlier calls are skipped
            message = json.loads(self.socket.recv())
            if message.get("id") == self.calls:
                assert "error" not in message, (method, message["error"])
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = ANSWER_S):
        """The expression's value once truthy; while the page loads it may also throw (no body yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except AssertionError:
                value = None
            if value:
                return value
            time.sleep(0.05)
        state = self.evaluate("document.body.dataset.state + ': ' + document.getElementById('status').textContent")
        raise AssertionError(f"waited {timeout} s for {expression}; the page is {state}")

    def click(self, selector: str) -> None:
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")  # fmt: skip
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Click the field, select what it holds and type over it."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.call("Input.insertText", text=text)

    def key(self, name: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code)

    def stop(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        try:  # its helper processes (renderer, zygote) are in its group too
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    executable = chromium()
    if executable is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    running = Browser(executable, tmp_path_factory.mktemp("chromium-profile"), tmp_path_factory.mktemp("chromium-log") / "chromium.log")
    try:
        running.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        running.call("Page.navigate", url=f"{server.url}/")
        yield running
    finally:
        running.stop()


CONVERSATION = """JSON.stringify({
  state: document.body.dataset.state,
  turns: [...document.querySelectorAll('#turns .turn')].map(t => ({
    role: t.classList.contains('user') ? 'user' : 'assistant',
    text: t.querySelector('.text').textContent,
    pieces: [...t.querySelectorAll('.text span')].map(s => [s.textContent, s.classList.contains('drafted'), Number(s.dataset.drafted)]),
    stats: (t.querySelector('.turn-stats') || {}).textContent || ''})),
  tps: document.getElementById('tps').textContent, mat: document.getElementById('mat').textContent,
  tokens: document.getElementById('tokens').textContent, steps: document.getElementById('steps').textContent})"""
COUNTED = {"tokens": "tokenrecycle_generated_tokens_total", "steps": "tokenrecycle_forward_passes_total", "drafted": "tokenrecycle_draft_tokens_accepted_total"}


def conversation(browser) -> dict:
    return json.loads(browser.evaluate(CONVERSATION))


def counted(http) -> dict[str, float]:
    return {name: metric(http, sample) for name, sample in COUNTED.items()}


def ask(browser, http, prompt: str) -> tuple[dict, dict]:
    """Send `prompt` from the page; the page then, and what the server counted for its answer."""
    turns = len(conversation(browser)["turns"])
    before = counted(http)
    browser.type("#prompt", prompt)
    browser.click("#send")  # the page adds both turns and leaves 'done' at once, before its first await
    browser.wait_until(f"document.body.dataset.state === 'done' && document.querySelectorAll('#turns .turn').length === {turns + 2}")
    after = counted(http)
    return conversation(browser), {name: int(after[name] - before[name]) for name in COUNTED}


def greedy_answer(http, messages: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"]["content"] for c in content_chunks(streamed(http, messages)))


def test_a_conversation_in_the_page_streams_shades_drafts_and_keeps_its_history(browser, http):
    # The server wants a key: the page asks for it, then lists the model.
    browser.wait_until("document.body.dataset.state === 'needs-key'", 20)
    assert browser.evaluate("document.getElementById('key-row').hidden") is False
    browser.type("#api-key", KEY)
    browser.click("#use-key")
    browser.wait_until("document.body.dataset.state === 'ready'", 10)
    assert browser.evaluate("document.getElementById('model').textContent") == MODEL
    browser.type("#temperature", "0")
    browser.type("#max-tokens", str(MAX_TOKENS))

    history = []
    for prompt in PROMPTS:
        page, server = ask(browser, http, prompt)
        user, answer = page["turns"][-2:]
        assert user == {"role": "user", "text": prompt, "pieces": [], "stats": ""}
        history.append({"role": "user", "content": prompt})
        # Lossless: the page shows what plain greedy decoding of the whole conversation gives.
        assert answer["text"] and answer["text"] == greedy_answer(http, history)
        history.append({"role": "assistant", "content": answer["text"]})
        # A piece is shaded exactly when the server said some of its tokens were accepted drafts.
        assert "".join(text for text, _, _ in answer["pieces"]) == answer["text"]
        assert all(shaded == (drafted > 0) for _, shaded, drafted in answer["pieces"])
        drafted = sum(d for _, _, d in answer["pieces"])
        assert 0 <= server["drafted"] - drafted <= 8  # the engine's count also has drafts cut by a stop, or held back
        # The numbers shown are the request's own: tokens, forward passes, their ratio; a rate.
        assert page["tokens"] == str(server["tokens"]) and page["steps"] == str(server["steps"])
        assert page["mat"] == f"{server['tokens'] / server['steps']:.2f}" and float(page["tps"]) > 0
        assert f"MAT {page['mat']}" in answer["stats"] and "tokens/s" in answer["stats"]
    assert [t["role"] for t in page["turns"]] == ["user", "assistant"] * 2
    assert any(shaded for t in page["turns"] for _, shaded, _ in t["pieces"]), "no accepted drafts: nothing shows speculation"
    save_screenshot(browser, page)


def test_stop_cancels_the_request_on_the_server(browser, http):
    browser.wait_until("document.body.dataset.state === 'done'", 5)  # after the conversation above
    browser.click("#new-chat")
    assert conversation(browser)["turns"] == []
    generated_before = metric(http, "tokenrecycle_generated_tokens_total")
    browser.type("#max-tokens", "900")
    browser.type("#temperature", "1")
    browser.type("#prompt", "Count to a thousand.")
    browser.key("Enter", 13)  # Enter sends
    browser.wait_until("document.body.dataset.state === 'streaming' && Number(document.getElementById('tokens').textContent) >= 3", 10)
    browser.click("#stop")
    browser.wait_until("document.body.dataset.state === 'stopped'", 5)
    assert browser.evaluate("document.getElementById('stop').disabled && !document.getElementById('send').disabled")
    last = conversation(browser)["turns"][-1]
    assert last["role"] == "assistant" and last["stats"].endswith("stopped")
    assert wait_for(lambda: metric(http, "tokenrecycle_active_slots") == 0, timeout=5)
    assert metric(http, "tokenrecycle_generated_tokens_total") - generated_before < 800  # far from its 900 tokens


# ---- the screenshot ----------------------------------------------------------------------------
def save_screenshot(browser, page: dict) -> None:
    """docs/chat-page.png, written when the page's file or its conversation changed (timings,
    which change every run, are left out of the signature)."""
    from PIL import Image, PngImagePlugin

    browser.evaluate("document.getElementById('prompt').blur(); document.getElementById('conversation').scrollTop = 0")
    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    image = Image.open(io.BytesIO(shot))
    assert image.size == (WIDTH, HEIGHT)
    shown = json.dumps([t["pieces"] for t in page["turns"]] + [page["mat"], page["tokens"], page["steps"]])
    signature = hashlib.sha256(PAGE.read_bytes() + shown.encode()).hexdigest()[:16]
    if SCREENSHOT.exists() and Image.open(SCREENSHOT).text.get(SIGNATURE_KEY) == signature:
        return
    info = PngImagePlugin.PngInfo()
    info.add_text(SIGNATURE_KEY, signature)
    image.convert("RGB").quantize(64).save(SCREENSHOT, optimize=True, pnginfo=info)
