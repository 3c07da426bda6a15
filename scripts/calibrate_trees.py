"""Measure how often each tree node is accepted, then print the best templates of each size.

    python scripts/calibrate_trees.py --dtype bfloat16 --sizes 4 8 16 32 48 80

Runs a wide, deep calibration tree on the prompts shipped in tokenrecycle/data (not the
benchmark's), counts for every rank path how often its node was accepted when its parent was,
and grows the best tree of each size from those rates (`trees.best_template`). This is how the
named templates in templates.py were made.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from tokenrecycle import Engine
from tokenrecycle.trees.design import expected_tokens
from tokenrecycle.trees import best_template, rank_budget_template
from tokenrecycle.tuning import calibration_prompts, count_acceptance


def count_all(engine: Engine, prompts: list[str], max_new: int) -> tuple[Counter, Counter]:
    visits, hits = Counter(), Counter()
    for prompt in prompts:
        count_acceptance(engine, engine.recycling, prompt, max_new, visits, hits)
    return visits, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 48, 80])
    parser.add_argument("--min-visits", type=int, default=20, help="rates from fewer visits are not trusted")
    args = parser.parse_args()
    engine = Engine(dtype=args.dtype, tree=rank_budget_template(8, 2, 8))
    prompts = calibration_prompts()
    count_all(engine, prompts[:4], 32)  # warm the table first: rates of a hot table
    visits, hits = count_all(engine, prompts, args.max_new_tokens)
    rates = {p: hits[p] / visits[p] for p in visits if visits[p] >= args.min_visits}
    for path in sorted(rates, key=lambda p: (len(p), p))[:40]:
        print(f"# {list(path)}: {rates[path]:.3f} ({visits[path]} visits)")
    for size in args.sizes:
        template = best_template(rates, size)
        depths = Counter(len(p) for p in template)
        expected = expected_tokens(template, rates) - 1  # drafts only, not the bonus token
        print(f"\n# {size} nodes, per depth {'/'.join(str(depths[d]) for d in sorted(depths))}, "
              f"expected accepted drafts per step {expected:.2f}")
        print(json.dumps([list(p) for p in template]))


if __name__ == "__main__":
    main()
