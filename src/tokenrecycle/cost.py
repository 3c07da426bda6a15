"""What verification costs on this machine: the runner's forward time against the tree size."""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack

import numpy as np

from .devices import synchronize
from .runners import ModelRunner
from .trees import chain_tree

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def forward_costs(
    runners: dict[str, ModelRunner], sizes=TREE_SIZES, context: int = 256, repeats: int = 11, seed: int = 0
) -> dict[str, dict[int, float]]:
    """Median ms of one forward pass of n tree tokens on top of `context` cached tokens, per runner.

    The sizes are swept `repeats` times in rounds, and the runners take turns at each size, so a
    slow spell of the machine spreads over every size and runner instead of bending the curve at
    one of them. One round before the measured ones is a warm-up and is not kept."""
    rng = np.random.default_rng(seed)
    vocab = min(runner.vocab_size for runner in runners.values())
    prompt = rng.integers(0, vocab, size=context)
    trees = {n: chain_tree(rng.integers(0, vocab, size=n)) for n in sizes}
    passes = (repeats + 1) * len(sizes)
    with ExitStack() as slots:
        slot = {name: slots.enter_context(runner.borrowed_slot()) for name, runner in runners.items()}
        for name, runner in runners.items():
            runner.prefill(slot[name], prompt, reserve=passes + 8)
        times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in runners}
        for round_index in range(repeats + 1):
            for n in sizes:
                for name, runner in runners.items():
                    synchronize(runner.device)
                    start = time.perf_counter()
                    runner.forward_tree(slot[name], trees[n])
                    synchronize(runner.device)  # a GPU's pass ends when its kernels do
                    elapsed = time.perf_counter() - start
                    runner.commit(slot[name], np.array([0]))  # keep the root only: the context stays (almost) fixed
                    if round_index > 0:
                        times[name][n].append(elapsed)
    return {name: {n: statistics.median(per_size[n]) * 1e3 for n in sizes} for name, per_size in times.items()}
