#!/usr/bin/env python
"""One forward step's time against the tree size, per way of running it, on one device:

    python scripts/gpu_step_times.py --device cuda --dtype bfloat16 --out step_times.md

- `graphs`: the fast runner's fixed-shape steps replayed as CUDA graphs (its default on a GPU);
- `fixed`: the same fixed steps run eagerly (what the graphs save is the ratio of these two);
- `eager`: the fast runner's eager steps, sliced to the visible keys (its path for batches);
- `hf`: the transformers runner.
The runners take turns at each size and round (cost.forward_costs: medians of 11 rounds after a
warm-up round, at 256 cached tokens), so a slow spell spreads over all of them. On the CPU the
graph row is left out (there are none).
"""

from __future__ import annotations

import argparse
import sys

from tokenrecycle.cost import TREE_SIZES, forward_costs
from tokenrecycle.devices import device_name, resolve_device
from tokenrecycle.models import load_model
from tokenrecycle.runners import FastRunner, HFRunner


def runners_for(model, device) -> dict:
    runners = {}
    if device.type == "cuda":
        runners["graphs"] = FastRunner(model, max_slots=1)
    runners["fixed"] = FastRunner(model, fixed_steps=True, graphs=False, max_slots=1)
    runners["eager"] = FastRunner(model, fixed_steps=False, max_slots=1)  # with the C++ loop on the CPU
    runners["hf"] = HFRunner(model, max_slots=1)
    return runners


def table(costs: dict[str, dict[int, float]], sizes) -> str:
    names = list(costs)
    lines = ["| tree tokens | " + " | ".join(f"{name} ms" for name in names) + " | fixed / graphs |", "|---" * (len(names) + 2) + "|"]
    for n in sizes:
        ratio = f"{costs['fixed'][n] / costs['graphs'][n]:.2f}x" if "graphs" in costs else "-"
        lines.append(f"| {n} | " + " | ".join(f"{costs[name][n]:.2f}" for name in names) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = load_model(args.model, args.dtype, device).model
    costs = forward_costs(runners_for(model, device), TREE_SIZES, args.context, repeats=args.repeats)
    text = (
        f"# Step time by tree size: {args.model} {args.dtype} on {device_name(device)} ({device}), "
        f"{args.context} cached tokens, median of {args.repeats} rounds\n\n{table(costs, TREE_SIZES)}\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
