#!/usr/bin/env python
"""Replicas benchmark: `tokenrecycle serve --replicas` on a local Ray instance against the
single-process server, on this machine's cores.

1. Throughput at concurrency 8 (`--concurrency`): the single-process server, one replica with
   every core's thread (`--replicas 1 --threads C`) and C replicas of one thread each (`--replicas
   C --threads 1`), each started alone, warmed up, sent the level's streamed greedy chat
   completions (Spec-Bench first turns, max_tokens 128) from that many clients, and stopped by
   its process id. `--rounds` repeats the whole set (the order rotates each round); the table
   has every round and the median over rounds per server.
2. The proxy's cost at concurrency 1: the single-process server and one Ray replica with the
   same threads, both loaded at once, every prompt through one and then the other, back to back
   (which goes first alternates), so load from elsewhere hits both alike. Reported as the ratio
   of tokens/s (Ray over single), the median per-prompt ratio, and the median added latency and
   time to first token.

    .venv/bin/python scripts/bench_replicas.py --per-category 1 --out bench-results/replicas.md

Servers and clients run on 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import (  # noqa: E402  (the serving benchmark's clients, servers and statistics)
    HOST, WARM_UP_PROMPTS, WARM_UP_TOKENS, ManagedServer, PairedResult, RunResult, ServerSpec, chat_body, level_prompts,
    load_prompts, machine_text, median, paired_row, prepare_tree, render_markdown, render_paired_markdown, render_text,
    rotated, run_level, stream_chat, table_row,
)  # fmt: skip

from tokenrecycle.server.cluster import cores_here  # noqa: E402


def specs(args: argparse.Namespace, cores: int) -> list[ServerSpec]:
    base = [str(Path(sys.executable).with_name("tokenrecycle")), "serve", "--model", args.model, "--dtype", args.dtype,
            "--tree", args.tree, "--host", HOST, "--max-slots", str(args.max_slots)]  # fmt: skip
    if args.no_tune:
        base.append("--no-tune")

    def serve(*extra: str):
        return lambda port, concurrency: base + [*extra, "--port", str(port)]

    return [
        ServerSpec(f"single process, {cores} threads", serve("--threads", str(cores)), "/health", "single"),
        ServerSpec(f"Ray, 1 replica x {cores} threads", serve("--replicas", "1", "--threads", str(cores)), "/health", "ray-1"),
        ServerSpec(f"Ray, {cores} replicas x 1 thread", serve("--replicas", str(cores), "--threads", "1"), "/health", f"ray-{cores}"),
    ]


def warm_up(server: ManagedServer, model: str, count: int, concurrency: int, timeout_s: float) -> None:
    """`count` requests, `concurrency` at a time, so that every replica gets some."""
    texts = [WARM_UP_PROMPTS[i % len(WARM_UP_PROMPTS)] for i in range(count)]
    _, records = run_level(lambda i, text: stream_chat(server.port, chat_body(model, text, WARM_UP_TOKENS), timeout_s, i), texts, concurrency)
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{server.spec.name}: warm-up failed: {failed[0]}\n{server.log_tail()}")


def throughput(spec: ServerSpec, prompts: Sequence[str], concurrency: int, args: argparse.Namespace, log_dir: Path, round_: int) -> RunResult:
    load_before = os.getloadavg()[0]
    with ManagedServer(spec, log_dir, args.start_timeout, concurrency) as server:
        model = server.model_name()
        warm_up(server, model, args.warm_up * concurrency, concurrency, args.request_timeout)
        wall, records = run_level(lambda i, p: stream_chat(server.port, chat_body(model, p, args.max_tokens), args.request_timeout, i), prompts, concurrency)
    return RunResult(f"{spec.name} (round {round_ + 1})", concurrency, wall, records, load_before, os.getloadavg()[0])


def proxy_cost(single: ServerSpec, ray: ServerSpec, prompts: Sequence[str], args: argparse.Namespace, log_dir: Path) -> PairedResult:
    """Each prompt through the Ray replica and through the single process, back to back."""
    load_before = os.getloadavg()[0]
    with ManagedServer(ray, log_dir, args.start_timeout) as on_ray, ManagedServer(single, log_dir, args.start_timeout) as alone:
        model = alone.model_name()
        for server in (on_ray, alone):
            warm_up(server, model, args.warm_up, 1, args.request_timeout)
        pairs = []
        for index, prompt in enumerate(prompts):
            body = chat_body(model, prompt, args.max_tokens)
            order = (on_ray, alone) if index % 2 == 0 else (alone, on_ray)
            records = {server: stream_chat(server.port, body, args.request_timeout, index) for server in order}
            pairs.append((records[on_ray], records[alone]))
    return PairedResult(f"{ray.name} over {single.name}", "recycling", pairs, load_before, os.getloadavg()[0])


def median_rows(runs: Sequence[RunResult], names: Sequence[str]) -> list[str]:
    lines = []
    for name in names:
        mine = [run for run in runs if run.name.startswith(name + " (round")]
        if mine:
            lines.append(f"| {name} | {len(mine)} | {median(r.tokens_per_s for r in mine):.1f} | {median(r.p95_latency_s for r in mine):.2f} | "
                         f"{median(r.median_latency_s for r in mine):.2f} | {median(r.median_tpot_s for r in mine) * 1000:.1f} | {sum(r.errors for r in mine)} |")  # fmt: skip
    header = "| server | rounds | aggregate tokens/s (median) | p95 latency (s) (median) | median latency (s) | median TPOT (ms) | errors |"
    return [header, "|---|---|---|---|---|---|---|", *lines]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default=None, help="Spec-Bench-style JSON lines (default: Spec-Bench, else MT-Bench)")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=None, help="requests at that concurrency (default max(prompts, 2 x concurrency))")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tree", default="auto")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--tune-seconds", type=float, default=60.0, help="with --tree auto and no profile: tuning time (each thread count)")
    parser.add_argument("--max-slots", type=int, default=8, help="serve --max-slots, per replica")
    parser.add_argument("--warm-up", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=400.0)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: throughput, proxy")
    parser.add_argument("--out", default="bench-results/replicas.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, cores = time.perf_counter(), cores_here()
    prompts, questions = load_prompts(args.questions, args.per_category)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    single, ray_one, ray_many = specs(args, cores)
    setup = prepare_tree(args)
    print(f"bench_replicas: {len(prompts)} prompts; {setup}; logs in {log_dir}", file=sys.stderr, flush=True)
    runs, paired = [], []
    try:
        if "throughput" not in args.skip:
            level = level_prompts(prompts, args.concurrency, args.requests)
            for round_ in range(args.rounds):
                for spec in rotated([single, ray_one, ray_many], round_):
                    runs.append(throughput(spec, level, args.concurrency, args, log_dir, round_))
                    print("bench_replicas: " + " · ".join(table_row(runs[-1])[:-1]), file=sys.stderr, flush=True)
        if "proxy" not in args.skip:
            paired.append(proxy_cost(single, ray_one, prompts, args, log_dir))
            print("bench_replicas: proxy · " + " · ".join(paired_row(paired[-1])[:9]), file=sys.stderr, flush=True)
    finally:
        ManagedServer.stop_all()
    names = [single.name, ray_one.name, ray_many.name]
    report = [
        "# Replicas on Ray Serve against the single-process server", "",
        f"- Machine: {machine_text()}, {cores} cores", f"- Setup: {setup}; serve --max-slots {args.max_slots} per replica",
        f"- Prompts: {len(prompts)} first turns from {Path(questions).name} ({args.per_category} per category); greedy; "
        f"max_tokens {args.max_tokens}; streamed chat completions; {args.warm_up} warm-up requests per client before each run, as many at once as the clients",
        f"- Command: `.venv/bin/python scripts/bench_replicas.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {(time.perf_counter() - started) / 60:.1f} minutes in all", "",
    ]  # fmt: skip
    if runs:
        report += [f"## Concurrency {args.concurrency}: medians over rounds", "", *median_rows(runs, names), "", "### Every round", "", render_markdown(runs), ""]
    if paired:
        report += ["## The proxy's cost at concurrency 1 (paired per prompt, back to back)", "", render_paired_markdown(paired), "",
                   "Here 'server' is the Ray route and 'generate' the single-process server."]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": [asdict(r) for r in runs], "paired": [asdict(p) for p in paired]}, indent=1))
    print(render_text(runs))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
