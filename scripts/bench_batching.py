#!/usr/bin/env python
"""Batching measurements in one process, on the engine (no server): what issue 17 asks to decide.

    .venv/bin/python scripts/bench_batching.py invariance --out bench-results/batching-invariance.md
    .venv/bin/python scripts/bench_batching.py prefill --out bench-results/batching-prefill.md
    .venv/bin/python scripts/bench_batching.py budget --out bench-results/batching-budget.md

invariance: how often a greedy request's tokens change with what shares its pass. Each prompt runs
  plain decoding alone (the reference), Token Recycling alone, and Token Recycling batched with all
  the other prompts, with equal trees (each request's table of its own: its trees do not depend on
  the others) and with the budget (trees cut by what else runs). Identical rate and the first
  position where tokens differ, per dtype.
prefill: some requests decode while a long prompt joins; per prompt-chunk size, the running
  requests' time per token while the prompt goes in against before it came, the longest step,
  and the joiner's time to first token. Settings interleave per round; medians over rounds.
budget: aggregate tokens/s of batches of N prompts run to the end, the batch tree budget against
  equal trees for everyone, and plain decoding batched; per round every setting runs the same
  prompts, the order rotating; medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from tokenrecycle import Engine, RequestSettings
from tokenrecycle.bench import per_category, read_questions
from tokenrecycle.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def prompts_of(args) -> list[str]:
    return [q.turns[0] for q in per_category(read_questions(args.questions), args.per_category)]


def run_to_end(engine: Engine, prompts: Sequence[str], settings: RequestSettings):
    """Submit all prompts at once, step until all end; (results, wall seconds)."""
    started = time.perf_counter()
    requests = [engine.submit(p, settings) for p in prompts]
    while not engine.idle:
        engine.step()
    return [r.result for r in requests], time.perf_counter() - started


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- invariance ----------------------------------------------------------------------------------
def invariance(args) -> str:
    prompts = prompts_of(args)
    settings = RequestSettings(args.max_tokens)
    rows = []
    for dtype in args.dtypes:
        loaded = load_model(args.model, dtype)
        slots = len(prompts)

        def engine(**options) -> Engine:
            return Engine(loaded, dtype=dtype, tree=args.tree, max_slots=slots, **options)

        plain = engine(batching=False)
        reference = [plain.complete(p, RequestSettings(args.max_tokens, drafter="plain")).token_ids for p in prompts]
        runs = {}
        for label, options in [("equal trees", dict(shared_table=False, tree_budget=False)),
                               ("tree budget", dict(shared_table=False)),
                               ("tree budget, shared table", dict())]:  # fmt: skip
            alone_engine, batched_engine = engine(batching=True, **options), engine(batching=True, **options)
            alone = [alone_engine.complete(p, settings).token_ids for p in prompts]
            together = [r.token_ids for r in run_to_end(batched_engine, prompts, settings)[0]]
            runs[label] = (alone, together)
        for label, (alone, together) in runs.items():
            for name, a, b in [("alone vs plain", alone, reference), ("batched vs alone", together, alone),
                               ("batched vs plain", together, reference)]:  # fmt: skip
                diffs = [first_difference(x, y) for x, y in zip(a, b)]
                same = sum(d is None for d in diffs)
                where = [d for d in diffs if d is not None]
                rows.append((dtype, label, name, f"{same}/{len(diffs)}", f"{100 * same / len(diffs):.0f}%",
                             statistics.median(where) if where else "-"))  # fmt: skip
        print(f"{dtype} done", file=sys.stderr)
    header = ("dtype", "trees", "comparison", "identical", "rate", "median first differing token")
    return table(header, rows)


# ---- prefill chunks --------------------------------------------------------------------------------
def long_prompt(prompts: Sequence[str], tokens: int, engine: Engine) -> str:
    text, i = "", 0
    while not text or len(engine.encode(text)) < tokens:
        text += prompts[i % len(prompts)] + "\n\n"
        i += 1
    return "Summarise the following questions in one paragraph.\n\n" + text


def prefill_round(engine: Engine, running_prompts, joiner: str, args) -> dict:
    settings = RequestSettings(args.max_tokens)
    running = [engine.submit(p, settings) for p in running_prompts]
    stamps: dict[str, list[float]] = {r.id: [] for r in running}
    joined = joiner_request = None
    step_times, during = [], []
    while not engine.idle:
        if joiner_request is None and all(len(stamps[r.id]) >= args.join_after for r in running):
            joiner_request, joined = engine.submit(joiner, RequestSettings(8)), time.perf_counter()
        prefilling = joiner_request is not None and joiner_request.first_token_at is None
        started = time.perf_counter()
        updates = engine.step()
        now = time.perf_counter()
        step_times.append(now - started)
        for u in updates:
            if u.request.id in stamps and u.tokens:
                stamps[u.request.id].append(now)
        if prefilling:
            during.append(now - started)
    # Running requests' time per token: steps before the join against steps while it prefilled.
    before = [b - a for r in running for a, b in zip(stamps[r.id][: args.join_after - 1], stamps[r.id][1 : args.join_after])]
    return {
        "tpot_before_ms": 1e3 * statistics.median(before),
        "step_during_ms": 1e3 * statistics.median(during) if during else float("nan"),
        "longest_step_ms": 1e3 * max(step_times),
        "ttft_s": joiner_request.first_token_at - joined,
        "prefill_steps": len(during),
    }


def prefill(args) -> str:
    prompts = prompts_of(args)
    loaded = load_model(args.model, args.dtypes[0])
    engines = {}
    for chunk in args.chunks:
        slots = args.running + 1
        engines[chunk] = Engine(loaded, dtype=args.dtypes[0], tree=args.tree, max_slots=slots, prefill_chunk=chunk,
                                max_batch_tokens=max(256, chunk + slots))  # fmt: skip
    joiner = long_prompt(prompts, args.prompt_tokens, next(iter(engines.values())))
    joiner_tokens = len(next(iter(engines.values())).encode(joiner))
    results = {chunk: [] for chunk in args.chunks}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = args.chunks[round_index % len(args.chunks):] + args.chunks[: round_index % len(args.chunks)]
        running = [prompts[(round_index * args.running + i) % len(prompts)] for i in range(args.running)]
        for chunk in order:
            result = prefill_round(engines[chunk], running, joiner, args)
            if round_index:
                results[chunk].append(result)
        print(f"round {round_index} done", file=sys.stderr)
    rows = []
    for chunk in args.chunks:
        got = results[chunk]
        med = {key: statistics.median(r[key] for r in got) for key in got[0]}
        ratio = statistics.median(r["step_during_ms"] / r["tpot_before_ms"] for r in got)
        rows.append((chunk if chunk < joiner_tokens else f"{chunk} (whole prompt)", f"{med['tpot_before_ms']:.1f}",
                     f"{med['step_during_ms']:.1f}", f"{ratio:.2f}x", f"{med['longest_step_ms']:.0f}",
                     f"{med['ttft_s']:.2f}", int(med["prefill_steps"])))  # fmt: skip
    header = ("prompt chunk", "running TPOT before (ms)", "step while prefilling (ms)", "ratio", "longest step (ms)",
              "joiner TTFT (s)", "prefill steps")  # fmt: skip
    note = f"{args.running} running requests; the joining prompt has {joiner_tokens} tokens; {args.rounds} rounds after a warm-up.\n\n"
    return note + table(header, rows)


# ---- the tree budget -------------------------------------------------------------------------------
def budget(args) -> str:
    prompts = prompts_of(args)
    loaded = load_model(args.model, args.dtypes[0])
    settings = RequestSettings(args.max_tokens)
    rows = []
    for concurrency in args.concurrency:
        engines = {
            "tree budget": Engine(loaded, dtype=args.dtypes[0], tree=args.tree, max_slots=concurrency),
            "equal trees": Engine(loaded, dtype=args.dtypes[0], tree=args.tree, max_slots=concurrency, tree_budget=False),
            "plain, batched": Engine(loaded, dtype=args.dtypes[0], tree=args.tree, max_slots=concurrency),
        }
        names = list(engines)
        rates = {name: [] for name in names}
        rounds = [prompts[i : i + concurrency] for i in range(0, len(prompts) - concurrency + 1, concurrency)] or [prompts[:concurrency]]
        for round_index, batch in enumerate([rounds[0]] + rounds):  # the first is a warm-up
            for name in names[round_index % 3:] + names[: round_index % 3]:
                run_settings = RequestSettings(args.max_tokens, drafter="plain") if name.startswith("plain") else settings
                results, seconds = run_to_end(engines[name], batch, run_settings)
                if round_index:
                    rates[name].append(sum(r.new_tokens for r in results) / seconds)
        ratio = statistics.median(b / e for b, e in zip(rates["tree budget"], rates["equal trees"]))
        rows.append((concurrency, len(rounds), *(f"{statistics.median(rates[n]):.1f}" for n in names), f"{ratio:.2f}x"))
        print(f"concurrency {concurrency} done", file=sys.stderr)
    header = ("concurrency", "rounds", *(f"{n} (tokens/s)" for n in ["tree budget", "equal trees", "plain, batched"]), "budget / equal (median of rounds)")
    return table(header, rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["invariance", "prefill", "budget"])
    parser.add_argument("--questions", default=str(SPEC_BENCH))
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--tree", default="auto")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128, 256, 4096])
    parser.add_argument("--running", type=int, default=4, help="prefill: requests decoding when the prompt joins")
    parser.add_argument("--join-after", type=int, default=8, help="prefill: tokens each running request has when it joins")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prefill: the joining prompt's length, about")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    text = {"invariance": invariance, "prefill": prefill, "budget": budget}[args.part](args)
    command = "scripts/bench_batching.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = f"{text}\n\n`{command}`; torch threads {args.threads}; model {args.model}, tree {args.tree}, max_tokens {args.max_tokens}.\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
