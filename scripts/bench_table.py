"""MAT and speed of Token Recycling from a cold table against warm tables that earlier runs saved.

    flock /tmp/bench.lock python scripts/bench_table.py --per-category 2

The bench's prompts (MT-Bench and HumanEval first turns, the first N of each category) decoded
greedily from three starting tables, interleaved per prompt in rotating order, each drafter hot
across the prompts as the bench's `tr` is:

    cold    an empty table (what every run started from before tables were kept)
    warm    the table an earlier run left on other prompts of the same sets (the next N of each
            category): a user's table after earlier, different questions
    replay  the table an earlier run left on these same prompts: what `make run` twice sees

Each warm table goes through its file (saved by one drafter, loaded into a new one), as between
two runs. Prints MAT (new tokens per forward pass), the median tokens/s and the median of the
per-prompt ratios to cold, and how many outputs equal cold's (all of them in float32; in bfloat16
a different tree can flip a near-tie).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tokenrecycle import Generator
from tokenrecycle.bench import default_questions, per_category

STARTS = ("cold", "warm", "replay")


def first_turns(questions) -> list[str]:
    return [question.turns[0] for question in questions]


def table_left_by(generator: Generator, prompts: list[str], max_new: int, path: Path):
    """A new drafter holding the table a run over `prompts` left, read back from its file."""
    earlier = generator.engine.recycling_drafter()
    for prompt in prompts:
        generator.generate(prompt, max_new, drafter=earlier)
    earlier.save(path)
    drafter = generator.engine.recycling_drafter()
    drafter.load(path)
    return drafter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    generator = Generator(args.model, dtype=args.dtype, max_slots=1)
    questions = default_questions()
    measured = per_category(questions, args.per_category)
    others = [q for q in per_category(questions, 2 * args.per_category) if q not in measured]
    prompts = first_turns(measured)
    with tempfile.TemporaryDirectory() as folder:
        drafters = {
            "cold": generator.engine.recycling_drafter(),
            "warm": table_left_by(generator, first_turns(others), args.max_new_tokens, Path(folder) / "warm.npz"),
            "replay": table_left_by(generator, prompts, args.max_new_tokens, Path(folder) / "replay.npz"),
        }
    runs = {start: [] for start in STARTS}
    for index, prompt in enumerate(prompts):
        order = STARTS[index % 3 :] + STARTS[: index % 3]  # rotating: no start always runs first
        for start in order:
            runs[start].append(generator.generate(prompt, args.max_new_tokens, drafter=drafters[start]))
    setup = generator.engine.describe()
    print(f"{args.model} · {setup.summary()} · {len(prompts)} prompts (first turns), greedy, {args.max_new_tokens} new tokens\n")
    print("| start | MAT | median tokens/s | vs cold (median per prompt) | outputs equal to cold |")
    print("|---|---|---|---|---|")
    for start in STARTS:
        results = runs[start]
        mat = sum(r.new_tokens for r in results) / sum(r.steps for r in results)
        speed = statistics.median(r.tokens_per_s for r in results)
        ratio = statistics.median(r.tokens_per_s / c.tokens_per_s for r, c in zip(results, runs["cold"]))
        equal = sum(r.token_ids == c.token_ids for r, c in zip(results, runs["cold"]))
        print(f"| {start} | {mat:.2f} | {speed:.1f} | {ratio:.2f}x | {equal}/{len(prompts)} |")


if __name__ == "__main__":
    main()
