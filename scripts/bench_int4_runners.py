"""int4 on the fast runner (C++ loop): torch's int4 kernel (the default) against the C++ extension's
kernel (TOKENRECYCLE_QMATMUL=1), both with a bf16 LM head, in
one process: the forward cost curve, then greedy decoding (plain and Token Recycling) per prompt,
the runners taking turns on each prompt after a warm-up (Token Recycling from a cold table each time).

    flock /tmp/bench.lock .venv/bin/python scripts/bench_int4_runners.py [--tokens 96]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch

from tokenrecycle.cost import forward_costs
from tokenrecycle.decoding import speculative_decode
from tokenrecycle.engine import Engine
from tokenrecycle.runners import FastRunner, linear

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
    "Explain in three sentences why the sky is blue.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
]
SIZES = (1, 2, 4, 8, 16, 32)


def kernel_runner(model) -> FastRunner:
    """int4 on the C++ kernel (TOKENRECYCLE_QMATMUL=1)."""
    with mock.patch.dict(os.environ, {linear.QMATMUL_SWITCH: "1"}):
        return FastRunner(model, quantize="int4")


def decode_rate(engine: Engine, runner, drafter, ids, tokens: int) -> tuple[float, float]:
    """tokens/s and tokens per step of one greedy decode."""
    start, steps, made = time.perf_counter(), 0, 0
    with runner.borrowed_slot() as slot:
        for step in speculative_decode(runner, slot, drafter, ids, tokens):
            steps, made = steps + 1, made + len(step.tokens)
    return made / (time.perf_counter() - start), made / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--tree", default="tr8")
    args = parser.parse_args()
    engine = Engine("smollm2", dtype="bfloat16", quantize="int4", tree=args.tree)
    new = kernel_runner(engine.loaded.model)
    runners = {"torch int4 (default)": engine.runner, "qmatmul": new}
    print(f"threads {torch.get_num_threads()}, kernels {engine.runner.kernel} and {new.kernel}")
    costs = forward_costs(runners, SIZES, context=256, repeats=7)
    print("\nforward ms on 256 cached tokens (ratio to n=1)")
    print(f"{'runner':24s}" + "".join(f"{n:>8d}" for n in SIZES))
    for name, curve in costs.items():
        print(f"{name:24s}{curve[1]:8.2f}" + "".join(f"{curve[n] / curve[1]:8.2f}" for n in SIZES[1:]))
    rates: dict[tuple[str, str], list[float]] = {}
    for index, prompt in enumerate(PROMPTS):
        ids = engine.encode(prompt)
        for name, runner in runners.items():
            for method in ("plain", args.tree):
                # a fresh, cold table per decode: both runners draft from the same state
                drafter = engine.build_drafter("plain") if method == "plain" else engine.recycling_drafter(hot_start=False)
                rate, per_step = decode_rate(engine, runner, drafter, ids, args.tokens)
                if index:  # the first prompt warms up
                    rates.setdefault((name, method), []).append(rate)
                    rates.setdefault((name, method + " MAT"), []).append(per_step)
    print(f"\ngreedy, {args.tokens} tokens, median over {len(PROMPTS) - 1} prompts (after one warm-up)")
    for (name, method), values in rates.items():
        print(f"{name:24s} {method:10s} {statistics.median(values):7.2f}")


if __name__ == "__main__":
    main()
