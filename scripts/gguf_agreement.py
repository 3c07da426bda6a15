"""How often tokenrecycle's greedy output on a GGUF's own weights (`--quantize gguf`) equals
llama.cpp's greedy output on the same file: a cross-check of both implementations.

    flock /tmp/bench.lock .venv/bin/python scripts/gguf_agreement.py [--model smollm2] [--per-category 2]

The bench's first turns (MT-Bench and HumanEval, the first N of each category, in their chat
template), greedy, --max-new-tokens each. For each prompt: whether the outputs are identical and
how many leading tokens agree. The same for the bf16 runner (the file dequantised by
transformers, rounded to bf16) beside it, for context. Full agreement is not expected: llama.cpp
multiplies with activations quantised to 8 bits and sums in its own order, so near-ties can go
either way; a wrong weight or layout shows up as disagreement from the first tokens on.
"""

from __future__ import annotations

import argparse
import statistics

from tokenrecycle.bench import default_questions, per_category
from tokenrecycle.bench.methods import MethodFactory

RUNS = {"gguf": "gguf-plain", "bf16": "plain"}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    factory = MethodFactory(args.model, "bfloat16")
    reference = factory.build("llamacpp")
    ours = {label: factory.build(name) for label, name in RUNS.items()}
    questions = per_category(default_questions(), args.per_category)
    prefixes: dict[str, list[int]] = {label: [] for label in ours}
    for question in questions:
        ids = factory.engine.encode([{"role": "user", "content": question.turns[0]}])
        expected = reference.run(ids, args.max_new_tokens).token_ids
        line = []
        for label, method in ours.items():
            got = method.run(ids, args.max_new_tokens).token_ids
            prefixes[label].append(common_prefix(got, expected) if got != expected else args.max_new_tokens)
            line.append(f"{label} {'same' if got == expected else f'first {prefixes[label][-1]} agree'}")
        print(f"{question.category:12s} {question.question_id:>12s}  " + ", ".join(line), flush=True)
    print(f"\n{args.model}, {len(questions)} prompts, {args.max_new_tokens} greedy tokens, against llama.cpp on the same GGUF")
    print("| weights | outputs identical | median tokens agreeing before the first difference |")
    print("|---|---|---|")
    for label, values in prefixes.items():
        same = sum(value == args.max_new_tokens for value in values)
        print(f"| {label} | {same} of {len(values)} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
