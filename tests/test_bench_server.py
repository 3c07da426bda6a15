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
    assert lines[2] == "| ours | 1 | 3 | 20 | 10.0 | 1.00 | 1.45 | 0.250 | 2.00 | 1 | 1.5-1.8 |"
    assert all(line.count("|") == len(bench.TABLE_HEADER) + 1 for line in lines)
    empty = bench.RunResult("down", 4, 1.0, [bench.RequestRecord(0, 1.0, error="refused")])
    assert bench.table_row(empty)[4:9] == ("0.0", "-", "-", "-", "-")


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
