"""scripts/bench_server.py's pure parts: SSE timing, percentiles, the table. No servers start."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_server.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def chunk(extra: dict | None = None, **choice) -> str:
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, **choice}], **(extra or {})})


def test_percentile_interpolates_between_ranks_as_numpy_does(bench):
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(values, 100) == 4.0
    assert bench.percentile(values, 50) == 2.5
    assert bench.percentile(values, 95) == pytest.approx(3.85)
    assert bench.percentile([7.0], 95) == 7.0
    assert math.isnan(bench.percentile([], 50))
    with pytest.raises(ValueError):
        bench.percentile(values, 101)


def test_parse_sse_times_the_first_text_not_the_role_chunk(bench):
    events = [
        (0.10, chunk(delta={"role": "assistant", "content": ""}, finish_reason=None).encode() + b"\n"),
        (0.10, b"\n"),
        (0.20, b": ping - 2025-01-01\r\n"),
        (0.35, chunk(delta={"content": "Hel"}, finish_reason=None)),
        (0.40, chunk(delta={"content": "lo"}, finish_reason=None)),
        (0.40, chunk({"tokenrecycle": {"steps": 1, "tokens": 2, "drafted": 1}}, delta={"content": ""}, finish_reason=None)),
        (0.45, chunk({"tokenrecycle": {"steps": 2, "mean_accepted": 1.5}}, delta={}, finish_reason="length")),
        (0.46, "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})),
        (0.47, "data: [DONE]"),
        (0.50, chunk(delta={"content": "after done"})),
    ]
    stream = bench.parse_sse(events)
    assert stream.ttft_s == 0.35
    assert stream.text == "Hello"
    assert stream.content_chunks == 2
    assert (stream.completion_tokens, stream.prompt_tokens) == (3, 12)
    assert stream.finish_reason == "length"
    assert stream.steps == 2  # the finish chunk's total, not a chunk's own count
    assert stream.done and stream.error is None
    assert bench.record_of(0, 0.5, stream).steps == 2


def test_a_stream_without_usage_counts_text_chunks_and_one_without_done_is_an_error(bench):
    stream = bench.parse_sse([(0.2, chunk(delta={"content": "a"})), (0.3, chunk(delta={"content": "b"}))])
    record = bench.record_of(0, 0.5, stream)
    assert (record.completion_tokens, record.tokens_from_usage) == (2, False)
    assert record.ttft_s == 0.2
    assert "[DONE]" in record.error


def test_error_events_and_bad_json_are_errors(bench):
    stream = bench.parse_sse([(0.1, 'data: {"error": {"message": "shutting down"}}'), (0.2, "data: [DONE]")])
    assert "shutting down" in stream.error and stream.done
    assert "not JSON" in bench.parse_sse([(0.1, "data: {oops"), (0.2, "data: [DONE]")]).error


def run(bench, name, concurrency, latencies, tokens=10, errors=0, wall=2.0):
    records = [bench.RequestRecord(i, lat, lat / 4, tokens, steps=tokens // 2) for i, lat in enumerate(latencies)]
    records += [bench.RequestRecord(len(records) + i, 9.0, error="HTTP 500") for i in range(errors)]
    return bench.RunResult(name, concurrency, wall, records, 1.5, 1.75)


def test_run_statistics_leave_failed_requests_out(bench):
    result = run(bench, "a", 2, [1.0, 2.0, 3.0], tokens=10, errors=1, wall=3.0)
    assert result.errors == 1 and result.tokens == 30
    assert result.tokens_per_s == 10.0
    assert result.median_latency_s == 2.0
    assert result.median_ttft_s == 0.5
    assert result.p95_latency_s == pytest.approx(2.9)
    assert result.mean_accepted == 2.0
    assert math.isnan(bench.RunResult("llama", 1, 1.0, [bench.RequestRecord(0, 1.0, 0.1, 5)]).mean_accepted)


def test_markdown_table_has_a_row_per_run_sorted_by_level_then_server_order(bench):
    runs = [run(bench, "llama", 2, [1.0]), run(bench, "ours", 2, [1.0]), run(bench, "ours", 1, [0.5, 1.5], errors=1)]
    text = bench.render_markdown(bench.sorted_runs(runs, ["ours", "llama"]))
    lines = text.splitlines()
    assert lines[0].startswith("| server | concurrency | requests |") and "aggregate tokens/s" in lines[0]
    assert lines[1] == "|" + "|".join(["---"] * len(bench.TABLE_HEADER)) + "|"
    assert [line.split(" | ")[0:2] for line in lines[2:]] == [["| ours", "1"], ["| ours", "2"], ["| llama", "2"]]
    # TTFT median 0.250, p95 0.3625; TPOT (0.375 / 9, 1.125 / 9) s: median 83.3 ms, p95 120.8 ms
    assert lines[2] == "| ours | 1 | 3 | 20 | 10.0 | 1.00 | 1.45 | 0.250 | 0.362 | 83.3 | 120.8 | 2.00 | 1 | 1.5-1.8 |"
    assert all(line.count("|") == len(bench.TABLE_HEADER) + 1 for line in lines)
    empty = bench.RunResult("down", 4, 1.0, [bench.RequestRecord(0, 1.0, error="refused")])
    assert bench.table_row(empty)[4:12] == ("0.0", "-", "-", "-", "-", "-", "-", "-")


def test_tpot_is_the_time_after_the_first_token_over_the_tokens_after_it(bench):
    record = bench.RequestRecord
    assert bench.tpot_s(record(0, 2.1, 0.1, 11)) == pytest.approx(0.2)
    assert bench.tpot_s(record(0, 0.3, 0.1, 2)) == pytest.approx(0.2)
    assert bench.tpot_s(record(0, 0.3, 0.1, 1)) is None  # one token: no time after the first
    assert bench.tpot_s(record(0, 0.3, None, 5)) is None  # no first token seen
    assert bench.tpot_s(record(0, 0.3, 0.1, 5, error="HTTP 500")) is None
    result = bench.RunResult("a", 2, 1.0, [record(0, 1.1, 0.1, 11), record(1, 2.1, 0.1, 11), record(2, 0.5, 0.5, 1),
                                           record(3, 3.1, 0.1, 11), record(4, 9.0, 0.1, 11, error="timed out")])  # fmt: skip
    assert result.tpots_s == pytest.approx([0.1, 0.2, 0.3])
    assert result.median_tpot_s == pytest.approx(0.2)
    assert result.p95_tpot_s == pytest.approx(0.29)
    assert result.p95_ttft_s == pytest.approx(0.44)  # the one-token request's TTFT still counts
    assert math.isnan(bench.RunResult("b", 1, 1.0, [record(0, 0.5, 0.5, 1)]).median_tpot_s)


def test_each_level_cycles_through_the_prompts_so_every_client_has_work(bench):
    prompts = [f"p{i}" for i in range(13)]
    assert bench.level_prompts(prompts, 1) == prompts
    assert bench.level_prompts(prompts, 4) == prompts  # 13 already exceeds 2 x 4
    level = bench.level_prompts(prompts, 16)
    assert len(level) == 32 and level[:13] == prompts and level[13:26] == prompts and level[26:] == prompts[:6]
    assert bench.level_prompts(prompts, 16, 4) == prompts[:4]
    assert bench.level_prompts(["a", "b"], 1, 5) == ["a", "b", "a", "b", "a"]
    assert bench.level_prompts([], 8) == []


def test_llama_server_gets_a_slot_per_client_and_the_context_for_each(bench):
    argv = bench.llama_server_argv("/v/bin/llama-server", "/m/model.gguf", 8123, 4, 2, 2048)
    assert argv[0] == "/v/bin/llama-server"

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert (value("--model"), value("--host"), value("--port")) == ("/m/model.gguf", "127.0.0.1", "8123")
    assert (value("--parallel"), value("--ctx-size")) == ("4", "8192")  # llama-server splits the context across slots
    assert (value("--threads"), value("--threads-batch")) == ("2", "2")
    assert "--cont-batching" in argv and "--no-cache-prompt" in argv and value("--cache-ram") == "0"
    cached = bench.llama_server_argv("llama-server", "m.gguf", 1, 16, 4, 1024, prompt_cache=True)
    assert "--no-cache-prompt" not in cached and "--cache-ram" not in cached
    assert cached[cached.index("--ctx-size") + 1] == "16384"


def test_server_argv_follows_the_level_and_a_missing_llama_server_is_skipped(bench, tmp_path):
    args = bench.parse_args(["--threads", "3", "--n-ctx", "1024", "--max-batch-tokens", "256"])
    assert args.concurrency == [1, 2, 4, 8, 16] and args.requests_per_level is None
    binary = tmp_path / "llama-server"
    specs = {spec.key: spec for spec in bench.server_specs(args, tmp_path / "m.gguf", binary)}
    assert tuple(specs) == bench.SERVER_KEYS
    llama = specs["llamacpp"]
    assert "make llama-server" in llama.missing and llama.ready_path == "/health"
    argv = llama.argv(9000, 8)
    assert argv[argv.index("--parallel") + 1] == "8" and argv[argv.index("--ctx-size") + 1] == "8192"
    assert argv[argv.index("--threads") + 1] == "3"
    binary.write_text("")
    assert bench.server_specs(args, tmp_path / "m.gguf", binary)[4].missing is None

    def slots(argv):
        return int(argv[argv.index("--max-slots") + 1])

    assert [slots(specs["tr"].argv(9000, c)) for c in (1, 4, 8, 16)] == [4, 4, 8, 16]
    auto = specs["auto"].argv(9000, 2)
    assert auto[auto.index("--drafter") + 1] == "auto" and auto[auto.index("--max-batch-tokens") + 1] == "256"
    plain = specs["plain"].argv(9000, 2)
    assert plain[plain.index("--drafter") + 1] == "plain" and plain[-2:] == ["--port", "9000"]
    unbatched = specs["unbatched"].argv(9000, 16)
    assert "--no-batching" in unbatched and "--max-batch-tokens" not in unbatched and slots(unbatched) == 16
    assert "--drafter" not in specs["tr"].argv(9000, 1)
    fixed = bench.server_specs(bench.parse_args(["--max-slots", "2"]), tmp_path / "m.gguf", binary)
    assert slots(fixed[0].argv(9000, 16)) == 2 and "--max-batch-tokens" not in fixed[0].argv(9000, 16)
    assert [s.key for s in bench.select_servers(list(specs.values()), None)] == list(bench.DEFAULT_SERVERS)
    assert [s.key for s in bench.select_servers(list(specs.values()), "llamacpp, tr")] == ["llamacpp", "tr"]
    with pytest.raises(ValueError):
        bench.select_servers(list(specs.values()), "tr,vllm")
    with pytest.raises(SystemExit):
        bench.parse_args(["--servers", "tr,vllm"])


def test_the_plot_has_a_line_per_server_and_is_written_as_png(bench, tmp_path):
    runs = [run(bench, "ours", 1, [1.0, 2.0]), run(bench, "llama", 2, [1.0], wall=1.0), run(bench, "ours", 2, [1.0]),
            bench.RunResult("down", 4, 1.0, [bench.RequestRecord(0, 1.0, error="refused")])]  # fmt: skip
    series = bench.plot_series(runs, ["ours", "llama"])
    assert list(series) == ["ours", "llama"]  # the server that never answered has no line
    assert [c for c, _, _ in series["ours"]] == [1, 2]
    assert series["llama"][0][:2] == (2, 10.0)
    assert series["ours"][0][2] == pytest.approx(1000 * median_tpot([1.0, 2.0]))
    path = bench.write_plot(runs, ["ours", "llama"], tmp_path / "plots" / "serving.png", "title")
    assert path == tmp_path / "plots" / "serving.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def median_tpot(latencies):
    values = sorted((lat - lat / 4) / 9 for lat in latencies)  # run(): TTFT = latency / 4, 10 tokens
    return (values[0] + values[-1]) / 2


def test_rotation_starts_each_level_with_the_next_server(bench):
    assert bench.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bench.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert bench.rotated([], 3) == []


def test_the_overhead_check_pairs_the_server_with_generate_prompt_by_prompt(bench):
    record = bench.RequestRecord
    pairs = [
        (record(0, 1.1, 0.12, 10), record(0, 1.0, 0.10, 10)),
        (record(1, 2.2, 0.30, 20), record(1, 2.0, 0.20, 21)),
        (record(2, 9.0, error="HTTP 503"), record(2, 1.0, 0.1, 10)),
    ]
    result = bench.PairedResult("tokenrecycle, Token Recycling", "recycling", pairs, 1.0, 1.2)
    assert len(result.ok) == 2 and result.same_tokens == 1
    assert result.server_tokens_per_s == pytest.approx(30 / 3.3)
    assert result.generate_tokens_per_s == pytest.approx(31 / 3.0)
    assert result.ratio == pytest.approx((30 / 3.3) / (31 / 3.0))
    assert result.median_added_ms == pytest.approx(150)
    assert result.median_added_ttft_ms == pytest.approx(60)
    row = bench.paired_row(result)
    assert row[0] == "tokenrecycle, Token Recycling (recycling)" and row[1] == "3" and row[6:9] == ("+150", "+60", "1")
    table = bench.render_paired_markdown([result]).splitlines()
    assert len(table) == 3 and table[0].startswith("| server (drafter) | prompts | server tokens/s |")
    (line,) = bench.paired_lines([result])
    assert f"ratio {result.ratio:.3f}" in line and "same token count on 1 of 2 prompts" in line


def test_the_report_names_skipped_servers_and_links_the_plot(bench):
    context = {"command": "bench", "prompts": 13, "per_category": 1, "questions": "q.jsonl", "max_tokens": 32, "warm_up": 2,
               "setup": "tokenrecycle not run", "gguf": "m.gguf", "threads": 2, "n_ctx": 2048, "machine": "cpu",
               "load_start": "1", "load_end": "1", "minutes": 1.0, "requests": "4 requests at concurrency 1",
               "notes": ["llama-server at concurrency 4: `llama-server --parallel 4`"], "plot": "serving.png",
               "skipped": ["llama.cpp server (llama-server, -np N): .venv/bin/llama-server not found; `make llama-server` builds it"]}  # fmt: skip
    text = bench.report_markdown([run(bench, "ours", 1, [1.0])], ["ours"], context)
    assert "4 requests at concurrency 1" in text and "n_ctx 2048 per slot" in text
    assert "- llama-server at concurrency 4: `llama-server --parallel 4`" in text
    assert "- Skipped: llama.cpp server (llama-server, -np N)" in text and "`make llama-server` builds it" in text
    assert text.rstrip().endswith("![tokens/s and median TPOT against concurrency](serving.png)")
    assert "| median TPOT (ms) |" in text
