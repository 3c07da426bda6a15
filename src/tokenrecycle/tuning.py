"""Tune the draft tree to this machine: measure, choose, and keep the result as a profile.

`tune` measures the runner's forward time against the tree size at two context lengths, runs a
wide calibration tree over prompts shipped with the package (not the benchmark's) to learn how
often each rank path is accepted when its parent is, and lets `tree_search.choose_tree` pick the
tree with the most expected tokens per second. The profile is a JSON file in the cache, keyed by
everything the choice depends on (model file, dtype, device, runner, weights, CPU or GPU, threads,
versions),
so a change of any of them means a new profile rather than a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .cost import forward_costs
from .decoding import speculative_decode
from .devices import device_name
from .hardware import cpu_model
from .files import atomic_write
from .models import cache_root
from .runners import ModelRunner
from .trees.design import TreePlan, choose_tree
from .trees import RankPath, offered_nodes, rank_budget_template, trim_to_topk

PROFILE_VERSION = 1
COST_CONTEXTS = (256, 1024)
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_TREE_NODES = COST_SIZES[-1] - 1  # the largest tree (with its root) the cost curve covers
CALIBRATION_TREE = rank_budget_template(6, 2, 8)  # 93 paths: wide at the top, deep along rank 0
CALIBRATION_TOKENS = 96
MIN_VISITS = 10  # a rate from fewer visits is noise; such paths are not chosen
MIN_PROMPTS = 3  # calibrated in full whatever the time budget, so every profile has rates
DEFAULT_SECONDS = 60.0

if TYPE_CHECKING:  # the engine calls tuning; tuning only reads the engine
    from .engine import Engine

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
@dataclass(frozen=True)
class ProfileKey:
    """Everything the best tree depends on. The model is named, not located: a profile says
    nothing about the machine's folders, and its file's size and time tell a changed file apart."""

    model: str
    model_file: str
    dtype: str
    runner: str
    loop: str  # the C++ loop makes each step cheaper
    quantize: str | None
    topk: int
    cpu: str
    threads: int
    torch: str
    device: str = "cpu"  # kind and model: "cpu", or "cuda: NVIDIA H200" (a GPU's curve is its own)
    version: int = PROFILE_VERSION
    kernel: str | None = None  # quantised weights: which kernel (each has its own cost curve)

    @classmethod
    def of(cls, model_path: Path, runner: ModelRunner, dtype: str, quantize: str | None, topk: int) -> ProfileKey:
        stat = Path(model_path).stat()
        device = runner.device
        return cls(
            model=Path(model_path).name, model_file=f"{stat.st_size}:{stat.st_mtime_ns}", dtype=dtype,
            runner=runner.kind.value, loop=runner.loop.value, quantize=quantize, topk=topk,
            cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__, kernel=runner.kernel,
            device="cpu" if device.type == "cpu" else f"{device.type}: {device_name(device)}",
        )  # fmt: skip

    def to_json(self) -> dict:
        data = asdict(self)
        if data["kernel"] is None:
            del data["kernel"]  # unquantised keys stay as they were before kernels were named
        return data

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]
        kind = self.device.partition(":")[0]
        return cache_root() / "profiles" / f"{Path(self.model).stem}-{self.dtype}-{kind}-{self.runner}-{digest}.json"


def read_profile(key: ProfileKey) -> tuple[Profile | None, str | None]:
    """This machine's profile for the key, or None and, when a file is there but cannot be used
    (damaged, another format), why: the caller keeps the static tree and says so."""
    path = key.path
    try:
        data = json.loads(path.read_text())
        profile = Profile.from_json(data)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"the tuning profile {path.name} cannot be read ({type(exc).__name__}); run tokenrecycle tune to replace it"
    if profile.key != key.to_json():
        return None, f"the tuning profile {path.name} was made for another setup; run tokenrecycle tune to replace it"
    return profile, None


def load_profile(key: ProfileKey) -> Profile | None:
    return read_profile(key)[0]


def save_profile(profile: Profile) -> Path:
    path = ProfileKey(**profile.key).path
    with atomic_write(path, "w") as f:
        json.dump(profile.to_json(), f, indent=1)
    return path


# ---- measuring -----------------------------------------------------------------------------
def tune(engine: Engine, seconds: float = DEFAULT_SECONDS, progress: Progress | None = None) -> Profile:
    """Measure the cost curve and the acceptance rates of the engine's setup within about
    `seconds`, choose, save under the engine's profile key."""
    report = progress or (lambda fraction, text: None)
    start = time.perf_counter()
    cost = {}
    for index, context in enumerate(COST_CONTEXTS):
        report(index * 0.15, f"forward cost at {context} cached tokens")
        cost[context] = forward_costs({"runner": engine.runner}, COST_SIZES, context, repeats=5)["runner"]
    remaining = max(seconds - (time.perf_counter() - start), seconds * 0.3)
    visits, hits = calibrate(engine, remaining, lambda f, t: report(0.3 + 0.7 * f, t))
    rates = {p: hits[p] / visits[p] for p in visits if visits[p] >= MIN_VISITS}
    plan = choose_tree(rates, mean_cost(cost), max_nodes=MAX_TREE_NODES)
    profile = Profile(
        engine.profile_key.to_json(), cost, rates, {p: visits[p] for p in rates}, plan,
        time.perf_counter() - start, time.strftime("%Y-%m-%d %H:%M:%S"),
    )  # fmt: skip
    save_profile(profile)
    report(1.0, "done")
    return profile


def calibration_prompts() -> list[str]:
    text = (resources.files("tokenrecycle") / "data" / "calibration_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def calibrate(engine: Engine, seconds: float, progress: Progress) -> tuple[dict, dict]:
    """Decode the shipped prompts with the wide calibration tree for about `seconds`, counting per
    rank path how often its node was offered with its parent accepted (visits) and was accepted
    itself (hits). The table is warmed first, as in use (hot start)."""
    drafter = engine.recycling_drafter(trim_to_topk(CALIBRATION_TREE, engine.topk))
    prompts = calibration_prompts()
    for prompt in prompts[:2]:
        count_acceptance(engine, drafter, prompt, 24, {}, {})
    visits: dict[RankPath, int] = {}
    hits: dict[RankPath, int] = {}
    start = time.perf_counter()
    deadline = start + seconds
    for index, prompt in enumerate(prompts[2:]):
        progress(min((time.perf_counter() - start) / seconds, 1.0), f"acceptance rates, prompt {index + 1}")
        count_acceptance(engine, drafter, prompt, CALIBRATION_TOKENS, visits, hits, deadline if index >= MIN_PROMPTS else None)
        if index + 1 >= MIN_PROMPTS and time.perf_counter() >= deadline:
            break
    return visits, hits


def count_acceptance(engine: Engine, drafter, prompt: str, max_new: int, visits: dict, hits: dict, deadline: float | None = None) -> None:
    """Decode one prompt with a template drafter, adding up per rank path how often its node was
    offered (its parent accepted) and accepted; stops at the end of the answer or the deadline."""
    paths = drafter.template.paths
    ids = engine.encode(prompt)
    with engine.runner.borrowed_slot() as slot:
        for step in speculative_decode(engine.runner, slot, drafter, ids, max_new):
            if engine.eos_ids.intersection(step.tokens):
                break  # past the end of the answer the text is not what a user would decode
            if step.tree is not None:
                for node, hit in zip(*offered_nodes(step.tree, step.accepted)):
                    path = paths[step.tree.source[node]]
                    visits[path] = visits.get(path, 0) + 1
                    hits[path] = hits.get(path, 0) + int(hit)
            if deadline is not None and time.perf_counter() >= deadline:
                break
