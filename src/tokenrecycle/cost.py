"""What verification costs on this machine: the runner's forward time against the tree size."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .runners import ModelRunner
from .trees import chain_tree

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def forward_costs(
    runners: dict[str, ModelRunner], sizes=TREE_SIZES, context: int = 256, repeats: int = 11, seed: int = 0
) -> dict[str, dict[int, float]]:
    """Median ms of one forward pass of n tree tokens on top of `context` cached tokens, per runner.

    Runners take turns at each size, so a slow spell of the machine hits them alike. The first
    pass over the smallest size is a warm-up and is not kept."""
    rng = np.random.default_rng(seed)
    vocab = min(runner.vocab_size for runner in runners.values())
    prompt = rng.integers(0, vocab, size=context)
    costs: dict[str, dict[int, float]] = {name: {} for name in runners}
    for n in (sizes[0], *sizes):
        tree = chain_tree(rng.integers(0, vocab, size=n))
        times: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            runner.prefill(prompt, reserve=repeats + 8)
        for _ in range(repeats):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.forward_tree(tree)
                times[name].append(time.perf_counter() - start)
                runner.commit(np.array([0]))  # keep the root only: the context stays (almost) fixed
        for name in runners:
            costs[name][n] = statistics.median(times[name]) * 1e3
    return costs
