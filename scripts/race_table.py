"""The race with llama.cpp as one table, from a finished `tokenrecycle bench` run that has a
`llamacpp` row: every method's median tokens/s and MAT, its speedup on its own runner, and its
tokens/s against llama.cpp's plain decoding paired per turn (median of the per-turn ratios, 90%
bootstrap interval), with the same paired figure against its own plain decoding.

    .venv/bin/python scripts/race_table.py bench-results/race-smollm2
"""

from __future__ import annotations

import argparse

from tokenrecycle.bench.metrics import OVERALL, against_best_rival, baseline_of, summarize
from tokenrecycle.bench.results import load_results

YARDSTICK = "llamacpp"


def paired(section, stats, method: str, rival: str) -> str:
    if method == rival:
        return "1.00x"
    found = [c for c in against_best_rival(section, stats, method=method, rivals=(rival,)) if c.category == OVERALL]
    return f"{found[0].ratio:.2f}x ({found[0].low:.2f}-{found[0].high:.2f})" if found else ""


def race_table(section) -> str:
    stats = summarize(section)
    rows = [
        f"| method | tokens/s | MAT | vs plain on its runtime, paired | vs llama.cpp plain, paired per turn ({YARDSTICK}) |",
        "|---|---|---|---|---|",
    ]
    for method in section.methods:
        overall = stats[method][OVERALL]
        baseline = baseline_of(section, method)
        own = paired(section, stats, method, baseline) if baseline and baseline != "ar" else ""  # not for plain decodings
        against = paired(section, stats, method, YARDSTICK) if YARDSTICK in section.methods else ""
        rows.append(f"| `{method}` | {overall.tokens_per_s:.1f} | {overall.mat:.2f} | {own} | {against} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the bench's --out directory")
    args = parser.parse_args()
    for section in load_results(args.out).sections:
        print(f"{section.dtype}, {len({(r.question_id, r.turn) for r in section.records})} turns\n")
        print(race_table(section))


if __name__ == "__main__":
    main()
