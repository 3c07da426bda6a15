"""Per-step forward time of the fast runner (the C++ loop) at a few tree sizes, for comparing two
checkouts (before and after a change to the loop): run it from each in turn, several times, and
compare the medians. One process per checkout and model, so each loads its own extension build.

    PYTHONPATH=OTHER_CHECKOUT/src .venv/bin/python scripts/bench_step_times.py --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json

import torch

import tokenrecycle
from tokenrecycle.cost import forward_costs
from tokenrecycle.engine import Engine

SIZES = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--weights", default="bf16,gguf", help="comma-separated: bf16, int4, gguf")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    runners = {}
    for weights in args.weights.split(","):
        engine = Engine(args.model, dtype="bfloat16", quantize=None if weights == "bf16" else weights, tree="tr8")
        runners[weights] = engine.runner
    costs = forward_costs(runners, SIZES, context=256, repeats=args.repeats)
    source = tokenrecycle.__file__
    for weights, curve in costs.items():
        print(json.dumps({"source": source, "model": args.model, "weights": weights, "threads": torch.get_num_threads(), "loop": runners[weights].loop.value, "ms": curve}))


if __name__ == "__main__":
    main()
