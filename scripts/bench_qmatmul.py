"""Time of one quantised matrix product against its row count: torch's int4 kernel (the old path),
the quantised kernel of the C++ extension (each kernel this CPU runs), and oneDNN's bf16 kernel,
on SmolLM2-135M's shapes. Prints median microseconds and the ratio to one row.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_qmatmul.py [--repeats 50]

Every size of every method is timed in turn within each round (interleaved), after a warm-up round;
each timing is the mean of --calls calls back to back (as the layers of a step run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenrecycle.runners.linear import Linear, TorchInt4Linear
from tokenrecycle.runners.native import native_module
from tokenrecycle.runners import quant

SHAPES = {"576->576": (576, 576), "576->1536": (1536, 576), "1536->576": (576, 1536), "lm head 576->49152": (49152, 576)}
ROWS = (1, 2, 4, 8, 16, 32)
NAMES = {1: "amx", 2: "avx512", 3: "generic"}


def methods(weight: torch.Tensor, module, generic: bool) -> dict:
    n = weight.shape[0]
    found = {"bf16 onednn": Linear(weight), "int4 torch (old)": TorchInt4Linear(weight)}
    q4, q8 = quant.quantize4(weight), quant.quantize8(weight)
    for kernel in module.qkernels():
        if kernel == 3 and not generic:
            continue  # the plain C++ kernel is the last resort, 10-100x slower
        found[f"q4 {NAMES[kernel]}"] = lambda x, k=kernel: module.qlinear(x, q4.packed, q4.scales, q4.mins, n, 4, None, k)
        found[f"q8 {NAMES[kernel]}"] = lambda x, k=kernel: module.qlinear(x, q8.packed, q8.scales, q8.mins, n, 8, None, k)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calls", type=int, default=10, help="calls timed together, back to back")
    parser.add_argument("--generic", action="store_true", help="time the plain C++ kernel too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = native_module()
    if isinstance(module, str):
        raise SystemExit(module)
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, auto kernel {module.qkernel_name(0)}, {args.repeats} rounds, median us")
    for shape in args.shapes:
        n, k = SHAPES[shape]
        weight = torch.randn(n, k).bfloat16()
        found = methods(weight, module, args.generic and n < 10000)
        inputs = {rows: torch.randn(rows, k).bfloat16() for rows in ROWS}
        times = {name: {rows: [] for rows in ROWS} for name in found}
        with torch.inference_mode():
            for round_index in range(args.repeats + 1):
                for rows in ROWS:
                    for name, call in found.items():
                        start = time.perf_counter()
                        for _ in range(args.calls):  # back to back, as in a step (threads stay awake)
                            call(inputs[rows])
                        if round_index:
                            times[name][rows].append((time.perf_counter() - start) / args.calls)
        print(f"\n{shape} ({n} x {k})")
        print(f"{'method':20s}" + "".join(f"{rows:>9d}" for rows in ROWS) + "   16/1")
        for name, per_rows in times.items():
            med = {rows: statistics.median(t) * 1e6 for rows, t in per_rows.items()}
            print(f"{name:20s}" + "".join(f"{med[rows]:9.1f}" for rows in ROWS) + f"  {med[16] / med[1]:5.2f}")


if __name__ == "__main__":
    main()
