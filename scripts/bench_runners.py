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


def forward_costs(runner, context: int = 256, repeats: int = 15) -> dict[int, float]:
    """Median ms of one forward pass of n tree tokens on top of `context` cached tokens."""
    rng = np.random.default_rng(0)
    costs = {}
    for n in COST_SIZES:
        runner.prefill(rng.integers(0, runner.vocab_size, size=context), reserve=repeats + 8)
        tree = chain_tree(rng.integers(0, runner.vocab_size, size=n))
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            runner.forward_tree(tree)
            times.append(time.perf_counter() - start)
            runner.commit(np.array([0]))
        costs[n] = statistics.median(times[2:]) * 1e3
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
    llama = load_llama_cpp(args.model) if args.model == "smollm2" else None
    curves = {"hf": forward_costs(hf.runner), "fast": forward_costs(fast.runner)}
    print(f"\n### Forward cost, {args.dtype}: ms for n tree tokens on 256 cached (ratio to n=1)\n")
    print(cost_table(curves) + "\n", flush=True)

    methods = {
        "generate": lambda p: hf.generate_plain(p, max_new_tokens=args.max_new_tokens),
        "hf-tr": lambda p: hf.generate(p, max_new_tokens=args.max_new_tokens),
        "fast-plain": lambda p: fast.generate(p, max_new_tokens=args.max_new_tokens, plain=True),
        "fast-tr": lambda p: fast.generate(p, max_new_tokens=args.max_new_tokens),
    }
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
        rows.append(row)
        print(
            f"  {index + 1}/{len(args.questions)} {question['category']:<11} "
            + " · ".join(f"{n} {row[f'{n}_tps']:.1f}" for n in names),
            file=sys.stderr,
            flush=True,
        )
    return {"curves": curves, "rows": rows, "tree": fast.tree_name, "llamacpp": llama is not None}


def speed_table(result: dict, dtype: str) -> str:
    rows = result["rows"]
    names = ["generate", "hf-tr", "fast-plain", "fast-tr"] + (["llamacpp"] if result["llamacpp"] else [])
    median = {n: statistics.median(r[f"{n}_tps"] for r in rows) for n in names}
    lines = [
        f"### {dtype}, tree `{result['tree']}`, {len(rows)} prompts",
        "",
        "| method | tok/s (median) | ms/token | vs model.generate | MAT | identical to model.generate |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        mat = statistics.mean(r[f"{n}_mat"] for r in rows) if n != "llamacpp" else float("nan")
        same = f"{statistics.mean(r[f'{n}_identical'] for r in rows):.0%}" if n != "llamacpp" else "n/a (Q4_1 compute)"
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
    if result["llamacpp"]:
        lines += [
            f"- fast TR / llama.cpp plain: {median['fast-tr'] / median['llamacpp']:.2f}x; "
            f"fast plain per-token time / llama.cpp's: {median['llamacpp'] / median['fast-plain']:.2f}x",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=Path("../shared/data/spec_bench/question.jsonl"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tree", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.questions.is_file():
        parser.exit(2, f"bench_runners: error: no question file at {args.questions}\n")
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    args.questions = [q for q in questions if q["category"] in MT_BENCH_CATEGORIES][: args.limit]
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{len(args.questions)} prompts, {args.max_new_tokens} new tokens")
    result = run(args)
    print("\n" + speed_table(result, args.dtype) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dtype": args.dtype, **result}, indent=1))


if __name__ == "__main__":
    main()
