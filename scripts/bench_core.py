"""Token Recycling against plain greedy `model.generate`, interleaved per prompt, one process.

    python scripts/bench_core.py --questions ../shared/data/spec_bench/question.jsonl \
        --dtypes bfloat16 float32 --out out/bench_core.json

Prints one markdown table per dtype: per category, the median tokens/s of each method, their
ratio (the speedup), the mean accepted tokens per step (MAT) and the share of outputs identical to
the baseline. Absolute times are context; the ratio is the result. By default only MT-Bench's 80
questions (first turns) run. (A full harness with peers, plots and reports is issue 3.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from tokenrecycle import Generator

MT_BENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
WARM_UP_PROMPTS = ["Hello! How are you?", "Write a haiku about autumn.", "List three prime numbers."]


def read_questions(path: Path, mt_bench_only: bool, limit: int | None) -> list[dict]:
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if mt_bench_only:
        questions = [q for q in questions if q["category"] in MT_BENCH_CATEGORIES]
    return questions[:limit] if limit else questions


def run_dtype(dtype: str, tree: str | None, questions: list[dict], max_new: int) -> tuple[list[dict], str]:
    generator = Generator("smollm2", dtype=dtype, tree=tree)
    for prompt in WARM_UP_PROMPTS:  # first calls pay one-off costs; the table warms on other text
        generator.generate_plain(prompt, max_new_tokens=16)
        generator.generate(prompt, max_new_tokens=16)
    rows = []
    for index, question in enumerate(questions):
        prompt = question["turns"][0]
        # Alternate which method runs first so neither always gets the warmer caches.
        if index % 2 == 0:
            plain = generator.generate_plain(prompt, max_new_tokens=max_new)
            ours = generator.generate(prompt, max_new_tokens=max_new)
        else:
            ours = generator.generate(prompt, max_new_tokens=max_new)
            plain = generator.generate_plain(prompt, max_new_tokens=max_new)
        rows.append(
            {
                "question_id": question["question_id"],
                "category": question["category"],
                "plain_tokens_per_s": plain.tokens_per_s,
                "tr_tokens_per_s": ours.tokens_per_s,
                "plain_seconds": plain.seconds,
                "tr_seconds": ours.seconds,
                "new_tokens": ours.new_tokens,
                "steps": ours.steps,
                "mat": ours.mean_accepted,
                "identical": ours.token_ids == plain.token_ids,
            }
        )
        print(
            f"  [{dtype}] {index + 1}/{len(questions)} {question['category']:<12} "
            f"plain {plain.tokens_per_s:5.1f} tok/s · TR {ours.tokens_per_s:5.1f} tok/s · MAT {ours.mean_accepted:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return rows, generator.tree_name


def summary_row(name: str, rows: list[dict]) -> str:
    plain = statistics.median(r["plain_tokens_per_s"] for r in rows)
    ours = statistics.median(r["tr_tokens_per_s"] for r in rows)
    mat = sum(r["new_tokens"] for r in rows) / sum(r["steps"] for r in rows)
    same = sum(r["identical"] for r in rows) / len(rows)
    return f"| {name} | {len(rows)} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f}x | {mat:.2f} | {same:.0%} |"


def table(dtype: str, tree: str, rows: list[dict]) -> str:
    lines = [
        f"### {dtype}, tree `{tree}`",
        "",
        "| category | prompts | plain tok/s (median) | TR tok/s (median) | speedup | MAT | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    by_category = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    lines += [summary_row(name, group) for name, group in by_category.items()]
    lines.append(summary_row("**overall**", rows))
    total = sum(r["plain_seconds"] for r in rows) / sum(r["tr_seconds"] for r in rows)
    lines += ["", f"Total wall-time ratio (plain / TR) over all prompts: {total:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=Path("../shared/data/spec_bench/question.jsonl"))
    parser.add_argument("--all-categories", action="store_true", help="not only MT-Bench's 80 questions")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--tree", default=None, help="tree for every dtype (default: the dtype's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the per-prompt rows as JSON here")
    args = parser.parse_args()
    if not args.questions.is_file():
        parser.exit(2, f"bench_core: error: no question file at {args.questions}\n")
    questions = read_questions(args.questions, not args.all_categories, args.limit)
    print(f"{len(questions)} prompts, {args.max_new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = {}
    for dtype in args.dtypes:
        start = time.perf_counter()
        rows, tree = run_dtype(dtype, args.tree, questions, args.max_new_tokens)
        results[dtype] = {"tree": tree, "rows": rows, "wall_seconds": time.perf_counter() - start}
        print("\n" + table(dtype, tree, rows) + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
