"""Tune the draft tree to this machine: measure, choose, and keep the result as a profile.

`tune` measures the runner's forward time against the tree size at two context lengths, runs a
wide calibration tree over prompts shipped with the package (not the benchmark's) to learn how
often each rank path is accepted when its parent is, and lets `tree_search.choose_tree` pick the
tree with the most expected tokens per second. The profile is a JSON file in the cache, keyed by
everything the choice depends on (model file, dtype, runner, weights, CPU, threads, versions),
so a change of any of them means a new profile rather than a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cost import forward_costs
from .decoding import speculative_decode
from .hardware import cpu_model
from .models import cache_root
from .trees.design import TreePlan, choose_tree
from .trees import RankPath, offered_nodes, rank_budget_template

PROFILE_VERSION = 1
COST_CONTEXTS = (256, 1024)
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_TREE_NODES = COST_SIZES[-1] - 1  # the largest tree (with its root) the cost curve covers
CALIBRATION_TREE = rank_budget_template(6, 2, 8)  # 93 paths: wide at the top, deep along rank 0
CALIBRATION_TOKENS = 96
MIN_VISITS = 10  # a rate from fewer visits is noise; such paths are not chosen
MIN_PROMPTS = 3  # calibrated in full whatever the time budget, so every profile has rates
DEFAULT_SECONDS = 60.0

Progress = Callable[[float, str], None]  # (fraction done, what is happening)


@dataclass
class Profile:
    key: dict
    cost_ms: dict[int, dict[int, float]]  # context -> tree tokens -> ms
    rates: dict[RankPath, float]  # acceptance when the parent was accepted
    visits: dict[RankPath, int]
    plan: TreePlan
    seconds: float
    created: str

    @property
    def mean_cost_ms(self) -> dict[int, float]:
        return mean_cost(self.cost_ms)

    def summary(self) -> str:
        plan = self.plan
        return (
            f"{plan.num_nodes} nodes, depth {plan.depth}, predicted {plan.expected_tokens:.2f} tokens per step "
            f"at {plan.step_ms:.1f} ms ({plan.tokens_per_s:.1f} tokens/s)"
        )

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "created": self.created,
            "seconds": self.seconds,
            "chosen_tree": {
                "paths": [list(p) for p in self.plan.paths],
                "nodes": self.plan.num_nodes,
                "depth": self.plan.depth,
                "expected_tokens_per_step": self.plan.expected_tokens,
                "step_ms": self.plan.step_ms,
                "tokens_per_s": self.plan.tokens_per_s,
            },
            "cost_ms": {str(c): {str(n): ms for n, ms in curve.items()} for c, curve in self.cost_ms.items()},
            "acceptance": {path_text(p): {"rate": r, "visits": self.visits[p]} for p, r in self.rates.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        cost = {int(c): {int(n): float(ms) for n, ms in curve.items()} for c, curve in data["cost_ms"].items()}
        rates = {parse_path(p): float(v["rate"]) for p, v in data["acceptance"].items()}
        visits = {parse_path(p): int(v["visits"]) for p, v in data["acceptance"].items()}
        tree = data["chosen_tree"]
        plan = TreePlan(tuple(tuple(p) for p in tree["paths"]), tree["expected_tokens_per_step"], tree["step_ms"])
        return cls(data["key"], cost, rates, visits, plan, data["seconds"], data["created"])


def path_text(path: RankPath) -> str:
    return ".".join(map(str, path))


def parse_path(text: str) -> RankPath:
    return tuple(int(part) for part in text.split("."))


def mean_cost(cost_ms: dict[int, dict[int, float]]) -> dict[int, float]:
    """The cost curve averaged over the measured context lengths."""
    sizes = set.intersection(*(set(curve) for curve in cost_ms.values()))
    return {n: float(np.mean([curve[n] for curve in cost_ms.values()])) for n in sorted(sizes)}


# ---- where profiles live ---------------------------------------------------------------------
def profile_key(generator) -> dict:
    """Everything the best tree depends on."""
    path = Path(generator.loaded.path)
    stat = path.stat()
    return {
        "version": PROFILE_VERSION,
        "model": str(path.resolve()),
        "model_file": f"{stat.st_size}:{stat.st_mtime_ns}",
        "dtype": generator.dtype,
        "runner": generator.runner_name,
        "loop": getattr(generator.runner, "loop", None),  # the C++ loop makes each step cheaper
        "quantize": generator.quantize,
        "topk": generator.topk,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def profile_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{Path(key['model']).stem}-{key['dtype']}-{key['runner']}-{digest}.json"
    return cache_root() / "profiles" / name


def load_profile(generator) -> Profile | None:
    """This machine's profile for the generator's setup; None if there is none or it is unusable
    (another key, an older format, a damaged file): then it is simply tuned again."""
    key = profile_key(generator)
    path = profile_path(key)
    try:
        data = json.loads(path.read_text())
        profile = Profile.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return profile if profile.key == key else None


def save_profile(profile: Profile) -> Path:
    path = profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    with os.fdopen(handle, "w") as f:
        json.dump(profile.to_json(), f, indent=1)
    os.replace(staging, path)  # whole or not at all
    return path


# ---- measuring -----------------------------------------------------------------------------
def tune(generator, seconds: float = DEFAULT_SECONDS, progress: Progress | None = None) -> Profile:
    """Measure the cost curve and the acceptance rates within about `seconds`, choose, save."""
    report = progress or (lambda fraction, text: None)
    start = time.perf_counter()
    cost = {}
    for index, context in enumerate(COST_CONTEXTS):
        report(index * 0.15, f"forward cost at {context} cached tokens")
        cost[context] = forward_costs({"runner": generator.runner}, COST_SIZES, context, repeats=5)["runner"]
    remaining = max(seconds - (time.perf_counter() - start), seconds * 0.3)
    visits, hits = calibrate(generator, remaining, lambda f, t: report(0.3 + 0.7 * f, t))
    rates = {p: hits[p] / visits[p] for p in visits if visits[p] >= MIN_VISITS}
    plan = choose_tree(rates, mean_cost(cost), max_nodes=MAX_TREE_NODES)
    profile = Profile(
        profile_key(generator), cost, rates, {p: visits[p] for p in rates}, plan,
        time.perf_counter() - start, time.strftime("%Y-%m-%d %H:%M:%S"),
    )  # fmt: skip
    save_profile(profile)
    report(1.0, "done")
    return profile


def calibration_prompts() -> list[str]:
    text = (resources.files("tokenrecycle") / "data" / "calibration_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def calibrate(generator, seconds: float, progress: Progress) -> tuple[dict, dict]:
    """Decode the shipped prompts with the wide calibration tree for about `seconds`, counting per
    rank path how often its node was offered with its parent accepted (visits) and was accepted
    itself (hits). The table is warmed first, as in use (hot start)."""
    tree = [path for path in CALIBRATION_TREE if max(path) < generator.topk]  # prefix-closed still
    drafter = generator.new_drafter(hot_start=True, tree=tree)
    prompts = calibration_prompts()
    for prompt in prompts[:2]:
        count_acceptance(generator, drafter, prompt, 24, {}, {})
    visits: dict[RankPath, int] = {}
    hits: dict[RankPath, int] = {}
    start = time.perf_counter()
    deadline = start + seconds
    for index, prompt in enumerate(prompts[2:]):
        progress(min((time.perf_counter() - start) / seconds, 1.0), f"acceptance rates, prompt {index + 1}")
        count_acceptance(generator, drafter, prompt, CALIBRATION_TOKENS, visits, hits, deadline if index >= MIN_PROMPTS else None)
        if index + 1 >= MIN_PROMPTS and time.perf_counter() >= deadline:
            break
    return visits, hits


def count_acceptance(generator, drafter, prompt: str, max_new: int, visits: dict, hits: dict, deadline: float | None = None) -> None:
    """Decode one prompt with a template drafter, adding up per rank path how often its node was
    offered (its parent accepted) and accepted; stops at the end of the answer or the deadline."""
    paths = drafter.template.paths
    ids = generator.encode(prompt)
    steps = speculative_decode(generator.runner, drafter, ids, max_new)
    for step in steps:
        if generator.eos_ids.intersection(step.tokens):
            break  # past the end of the answer the text is not what a user would decode
        if step.tree is not None:
            for node, hit in zip(*offered_nodes(step.tree, step.accepted)):
                path = paths[step.tree.source[node]]
                visits[path] = visits.get(path, 0) + 1
                hits[path] = hits.get(path, 0) + int(hit)
        if deadline is not None and time.perf_counter() >= deadline:
            break
    steps.close()
