"""The two runners side by side, and next to llama.cpp, in one process.

    python scripts/bench_runners.py --questions ../shared/data/spec_bench/question.jsonl --dtype bfloat16

Prints (1) each runner's cost curve: forward time of n tree tokens on a cache of 256 tokens, and
(2) per MT-Bench first turn, interleaved with a rotating order after warm-up: transformers'
`model.generate` (the reference), Token Recycling on the transformers runner, plain decoding and
Token Recycling on the fast runner, and llama.cpp's plain decoding of the same GGUF when
llama-cpp-python is installed. Medians of tokens/s; speedups are ratios of medians against
`model.generate` unless stated. The gain from the runner (fast plain vs model.generate) and from
drafting (fast TR vs fast plain) are shown separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenrecycle import Generator
from tokenrecycle.hardware import cpu_model
from tokenrecycle.models import bundled_gguf
from tokenrecycle.trees import chain_tree

MT_BENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
WARM_UP_PROMPTS = ["Hello! How are you?", "Write a haiku about autumn.", "List three prime numbers."]
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def forward_costs(runners: dict, context: int = 256, repeats: int = 21) -> dict[str, dict[int, float]]:
    """Median ms of one forward pass of n tree tokens on top of `context` cached tokens, per runner.

    Runners take turns at each size, so a slow spell of the machine hits them alike."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 49152, size=context)
    costs: dict[str, dict[int, float]] = {name: {} for name in runners}
    for n in (1, *COST_SIZES):  # the first pass over n=1 is a warm-up and is overwritten
        tree = chain_tree(rng.integers(0, 49152, size=n))
        times: dict[str, list[float]] = {name: [] for name in runners}
        for name, runner in runners.items():
            runner.prefill(prompt, reserve=repeats + 8)
        for _ in range(repeats):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.forward_tree(tree)
                times[name].append(time.perf_counter() - start)
                runner.commit(np.array([0]))
        for name in runners:
            costs[name][n] = statistics.median(times[name]) * 1e3
    return costs


def cost_table(curves: dict[str, dict[int, float]]) -> str:
    lines = ["| runner | " + " | ".join(f"n={n}" for n in COST_SIZES) + " |", "|---|" + "---|" * len(COST_SIZES)]
    for name, costs in curves.items():
        one = costs[1]
        cells = [f"{costs[1]:.1f} ms"] + [f"{costs[n]:.1f} ({costs[n] / one:.2f})" for n in COST_SIZES[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class LlamaCpp:
    """llama.cpp plain greedy decoding of the GGUF, given the same prompt token ids."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, verbose=False)

    def generate(self, prompt_ids: list[int], max_new: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = self.llm.create_completion(prompt=prompt_ids, max_tokens=max_new, temperature=0.0, top_k=1)
        seconds = time.perf_counter() - start
        return out["usage"]["completion_tokens"] / seconds, out["usage"]["completion_tokens"]


def load_llama_cpp(model: str) -> LlamaCpp | None:
    try:
        return LlamaCpp(bundled_gguf(model), torch.get_num_threads())
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
        return None


def run(args) -> dict:
    fast = Generator(args.model, dtype=args.dtype, runner="fast", tree=args.tree)
    hf = Generator(args.model, dtype=args.dtype, runner="hf", tree=args.tree)
    int4 = Generator(args.model, dtype=args.dtype, quantize="int4", tree=args.int4_tree) if args.int4 else None
    llama = load_llama_cpp(args.model) if args.model == "smollm2" else None
    runners = {"hf": hf.runner, "fast": fast.runner, **({"fast int4": int4.runner} if int4 else {})}
    curves = forward_costs(runners)
    print(f"\n### Forward cost, {args.dtype}: ms for n tree tokens on 256 cached (ratio to n=1)\n")
    print(cost_table(curves) + "\n", flush=True)

    new = args.max_new_tokens
    methods = {
        "generate": lambda p: hf.generate_plain(p, max_new_tokens=new),
        "hf-tr": lambda p: hf.generate(p, max_new_tokens=new),
        "fast-plain": lambda p: fast.generate(p, max_new_tokens=new, plain=True),
        "fast-tr": lambda p: fast.generate(p, max_new_tokens=new),
    }
    if int4:
        methods["int4-plain"] = lambda p: int4.generate(p, max_new_tokens=new, plain=True)
        methods["int4-tr"] = lambda p: int4.generate(p, max_new_tokens=new)
    for prompt in WARM_UP_PROMPTS:
        for method in methods.values():
            method(prompt)
        if llama:
            llama.generate(fast.encode(prompt).tolist(), 16)
    rows = []
    for index, question in enumerate(args.questions):
        prompt = question["turns"][0]
        names = list(methods) + (["llamacpp"] if llama else [])
        shift = index % len(names)
        row = {"question_id": question["question_id"], "category": question["category"]}
        for name in names[shift:] + names[:shift]:  # rotate who runs first
            if name == "llamacpp":
                row["llamacpp_tps"], row["llamacpp_tokens"] = llama.generate(fast.encode(prompt).tolist(), args.max_new_tokens)
                continue
            result = methods[name](prompt)
            row[f"{name}_tps"] = result.tokens_per_s
            row[f"{name}_mat"] = result.mean_accepted
            row[f"{name}_ids"] = result.token_ids
        reference = row["generate_ids"]
        for name in methods:
            row[f"{name}_identical"] = row[f"{name}_ids"] == reference
        row["fast-tr_identical_to_fast-plain"] = row["fast-tr_ids"] == row["fast-plain_ids"]
        if int4:
            row["int4-tr_identical_to_int4-plain"] = row["int4-tr_ids"] == row["int4-plain_ids"]
        rows.append(row)
        print(
            f"  {index + 1}/{len(args.questions)} {question['category']:<11} "
            + " · ".join(f"{n} {row[f'{n}_tps']:.1f}" for n in names),
            file=sys.stderr,
            flush=True,
        )
    return {
        "curves": curves,
        "rows": rows,
        "tree": fast.tree_name,
        "int4_tree": int4.tree_name if int4 else None,
        "methods": list(methods) + (["llamacpp"] if llama else []),
    }


def speed_table(result: dict, dtype: str) -> str:
    rows = result["rows"]
    names = result["methods"]
    median = {n: statistics.median(r[f"{n}_tps"] for r in rows) for n in names}
    int4_note = f", int4 tree `{result['int4_tree']}`" if result["int4_tree"] else ""
    lines = [
        f"### {dtype}, tree `{result['tree']}`{int4_note}, {len(rows)} prompts",
        "",
        "| method | tok/s (median) | ms/token | vs model.generate | MAT | identical to model.generate |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        mat = statistics.mean(r[f"{n}_mat"] for r in rows) if n != "llamacpp" else float("nan")
        other_weights = n == "llamacpp" or n.startswith("int4")
        same = "n/a (other weights)" if other_weights else f"{statistics.mean(r[f'{n}_identical'] for r in rows):.0%}"
        lines.append(
            f"| {n} | {median[n]:.1f} | {1000 / median[n]:.1f} | {median[n] / median['generate']:.2f}x | "
            f"{mat:.2f} | {same} |"
        )
    same_runner = statistics.mean(r["fast-tr_identical_to_fast-plain"] for r in rows)
    lines += [
        "",
        f"- gain from the runner (fast plain / model.generate): {median['fast-plain'] / median['generate']:.2f}x",
        f"- gain from drafting (fast TR / fast plain): {median['fast-tr'] / median['fast-plain']:.2f}x; "
        f"fast TR output identical to fast plain: {same_runner:.0%}",
    ]
    if "int4-tr" in median:
        same_int4 = statistics.mean(r["int4-tr_identical_to_int4-plain"] for r in rows)
        lines.append(
            f"- int4 (a model of its own): drafting gain {median['int4-tr'] / median['int4-plain']:.2f}x; "
            f"int4 TR output identical to int4 plain: {same_int4:.0%}"
        )
    if "llamacpp" in median:
        for name in [n for n in names if n not in ("generate", "hf-tr", "llamacpp")]:
            lines.append(
                f"- {name} vs llama.cpp plain: {median[name] / median['llamacpp']:.2f}x tokens/s "
                f"(per-token time {median['llamacpp'] / median[name]:.2f}x llama.cpp's)"
            )
    return "\n".join(lines)


def category_table(result: dict) -> str:
    """Median tokens/s of every method per category, and Token Recycling's speedups there."""
    names = result["methods"]
    by_category: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_category.setdefault(row["category"], []).append(row)
    header = "| category | " + " | ".join(names) + " | fast-tr / generate | fast-tr / fast-plain | MAT fast-tr |"
    lines = [header, "|---|" + "---|" * (len(names) + 3)]
    for category, rows in [*by_category.items(), ("**overall**", result["rows"])]:
        median = {n: statistics.median(r[f"{n}_tps"] for r in rows) for n in names}
        mat = statistics.mean(r["fast-tr_mat"] for r in rows)
        lines.append(
            f"| {category} | " + " | ".join(f"{median[n]:.1f}" for n in names)
            + f" | {median['fast-tr'] / median['generate']:.2f}x | {median['fast-tr'] / median['fast-plain']:.2f}x | {mat:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=Path("../shared/data/spec_bench/question.jsonl"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tree", default=None)
    parser.add_argument("--int4", action="store_true", help="also the fast runner with int4 weights")
    parser.add_argument("--int4-tree", default=None, help="tree for the int4 TR row (default: the int4 default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="print the tables of a saved --out file, run nothing")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        saved["curves"] = {name: {int(n): ms for n, ms in costs.items()} for name, costs in saved["curves"].items()}
        print(cost_table(saved["curves"]) + "\n\n" + speed_table(saved, saved["dtype"]) + "\n\n" + category_table(saved))
        return
    if not args.questions.is_file():
        parser.exit(2, f"bench_runners: error: no question file at {args.questions}\n")
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    args.questions = [q for q in questions if q["category"] in MT_BENCH_CATEGORIES][: args.limit]
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{len(args.questions)} prompts, {args.max_new_tokens} new tokens")
    result = run(args)
    print("\n" + speed_table(result, args.dtype) + "\n")
    print(category_table(result) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dtype": args.dtype, **result}, indent=1))


if __name__ == "__main__":
    main()
