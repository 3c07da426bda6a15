"""The decoding methods a benchmark compares, each behind one small interface: token ids in,
token ids, time and accepted lengths out.

- `ar`: plain greedy `model.generate` of transformers, the reference every method is checked against.
- `plain`, `tr`, `tr-cold`: tokenrecycle on its default runner: one token per step, Token
  Recycling with a table kept across requests (hot) or restarted per request from the prompt (cold).
- `tr-hf`: Token Recycling on the transformers runner; `int4-plain`, `int4-tr`, `int4-auto`: the
  fast runner with 4-bit weights (a model of its own, so checked against its own plain decoding);
  `gguf-plain`, `gguf-tr`, `gguf-auto`: the same with the GGUF file's own 4/8-bit weights on the
  C++ kernel (`--quantize gguf`, the weights llama.cpp runs).
- `sps`, `rsd`: drafts sampled from a draft model (by default an early exit of the target: its
  first quarter of layers): a chain with an adaptive length (speculative sampling) and a tree
  drawn without replacement (Recursive Speculative Decoding, branching 2, 2, 1); `rsd-sbs`: the
  same with a stochastic beam search (width 3, depth 3) choosing the tree.
- `lookup`: tokenrecycle's prompt lookup drafter (several earlier continuations merged in a tree).
- `merged`, `auto`: Token Recycling, lookup and retrieval in one tree; auto lets a bandit choose
  among them and their merges by the tokens per second each step gives.
- `retrieval`: the most frequent continuations from a suffix automaton over `--datastore` (if
  given), the prompts and the earlier outputs of the run.
- `hf-pld`, `hf-assisted`: transformers' prompt lookup and assisted decoding (a draft model that
  shares the tokenizer).
- `llamacpp`, `llamacpp-pld`: llama.cpp plain greedy decoding of the same GGUF, and its prompt
  lookup drafter, when llama-cpp-python is installed.

Each method names its baseline: plain decoding on its own runtime.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..drafters import AdaptiveTreeDrafter, Drafter
from ..drafters.auto import AutoDrafter
from ..suffix_automaton import SuffixAutomaton
from ..errors import TokenRecycleError
from ..drafters.draft_model import DraftShape
from ..engine import Engine
from ..models import LoadedModel, load_model, resolve
from ..reference import hf_generate
from ..request import RequestSettings
from ..runners import HFRunner, RunnerKind
from ..sampling import Sampling
from ..trees.choice import TUNED
from .metrics import temperature_suffix
from .results import portable_path

BASE_METHODS = (
    "ar", "plain", "tr", "tr-cold", "tr-hf", "int4-plain", "int4-tr", "int4-auto", "gguf-plain", "gguf-tr", "gguf-auto",
    "sps", "rsd", "rsd-sbs", "lookup", "retrieval", "merged", "auto", "hf-pld", "hf-assisted", "llamacpp", "llamacpp-pld",
)  # fmt: skip
DEFAULT_METHODS = ("ar", "plain", "tr", "tr-cold", "hf-pld", "hf-assisted", "llamacpp", "llamacpp-pld")
TREE_METHODS = ("tr", "tr-cold", "tr-hf", "int4-tr", "gguf-tr")  # expanded once per tree asked for
REFERENCE = "ar"


class MethodUnavailable(TokenRecycleError):
    """A method cannot run here (optional package missing, no draft model, no GGUF file)."""


@dataclass(frozen=True)
class Variant:
    """A method as a run asks for it: its name and, for a sampled run, the sampling. Sampled runs
    are methods of their own, named ~tT, measured against their baseline's run at the same T."""

    name: str
    sampling: Sampling | None = None  # None: greedy
    suffix: str = ""  # ~tT for a sampled run

    @classmethod
    def of(cls, name: str, sampling: Sampling | None = None) -> Variant:
        suffix = temperature_suffix(sampling.temperature) if sampling else ""
        return cls(name + suffix, sampling, suffix)

    def baseline(self, base: str | None) -> str | None:
        """The run this variant of a method is measured against, given the method's baseline."""
        return base and base + self.suffix


@dataclass
class MethodRun:
    token_ids: list[int]
    seconds: float
    accepted_lengths: list[int]  # tokens decided by each forward pass of the target, prefill first
    details: dict | None = None  # method-specific counters (the auto drafter's credit and plays)


@dataclass
class Method(ABC):
    name: str
    baseline: str | None  # plain decoding on the same runtime; None for the reference itself
    description: str
    settings: dict = field(default_factory=dict)
    sampling: Sampling | None = None  # None: greedy

    @abstractmethod
    def run(self, prompt_ids: np.ndarray, max_new_tokens: int) -> MethodRun: ...

    @property
    def drafter_bytes(self) -> int:
        return 0


@dataclass
class TransformersMethod(Method):
    """`model.generate` with optional generation options (prompt lookup, assistant)."""

    model: torch.nn.Module = None
    eos_ids: set[int] = field(default_factory=set)
    options: dict = field(default_factory=dict)

    def run(self, prompt_ids: np.ndarray, max_new_tokens: int) -> MethodRun:
        counter = PassCounter()
        hook = self.model.register_forward_pre_hook(counter.before_pass)
        try:
            start = time.perf_counter()
            options = {**self.options, **(self.sampling.generate_options() if self.sampling else {})}
            tokens = hf_generate(self.model, prompt_ids, max_new_tokens, self.eos_ids, streamer=counter, **options)
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return MethodRun(tokens, seconds, counter.accepted_lengths())


class PassCounter:
    """Tokens decided by each forward pass of the target in transformers' `generate`, from its own
    public hooks rather than its internals: a forward pre-hook on the target marks each pass, and
    `generate` hands every decided token to its streamer once, right after the pass that decided
    it (the prompt first, before any pass). Plain greedy decoding is one token a pass; prompt
    lookup and assisted decoding the accepted candidates plus one (the prefill verifies too)."""

    def __init__(self):
        self.decided = 0  # new tokens put so far
        self.decided_at_pass: list[int] = []
        self._prompt_put = False

    def before_pass(self, module, args) -> None:
        self.decided_at_pass.append(self.decided)

    def put(self, token_ids) -> None:
        if self._prompt_put:
            self.decided += token_ids.numel()
        self._prompt_put = True

    def end(self) -> None:
        pass

    def accepted_lengths(self) -> list[int]:
        marks = self.decided_at_pass + [self.decided]
        return [after - before for before, after in zip(marks, marks[1:])]


@dataclass
class OwnLoopMethod(Method):
    """tokenrecycle's own loop on an engine's runner, with a drafter of its own (None: plain)."""

    engine: Engine = None
    drafter: Drafter | None = None

    def run(self, prompt_ids: np.ndarray, max_new_tokens: int) -> MethodRun:
        settings = RequestSettings(max_new_tokens, sampling=self.sampling, drafter=self.drafter or "plain")
        result = self.engine.complete(prompt_ids, settings)
        details = None
        if isinstance(self.drafter, AutoDrafter):  # cumulative over the run so far
            details = {"credit": dict(self.drafter.credit), "plays": dict(zip(self.drafter.arm_names, self.drafter.plays))}
            if self.drafter.adapt:
                details["most played per evidence"] = self.drafter.favourites()
        return MethodRun(result.token_ids, result.seconds, result.accepted_lengths, details)

    @property
    def drafter_bytes(self) -> int:
        return self.drafter.memory_bytes if self.drafter is not None else 0


@dataclass
class LlamaCppMethod(Method):
    """llama.cpp decoding through llama-cpp-python, fed the same token ids."""

    llm: object = None
    eos_ids: set[int] = field(default_factory=set)

    def run(self, prompt_ids: np.ndarray, max_new_tokens: int) -> MethodRun:
        llm = self.llm
        tokens: list[int] = []
        tokens_at_eval: list[int] = []
        evaluate = llm.eval

        def counting_eval(batch):  # one call is one forward pass of the target
            tokens_at_eval.append(len(tokens))
            evaluate(batch)

        llm.reset()  # no reuse of an earlier request's prefix: every method prefills in full
        llm.eval = counting_eval
        try:
            start = time.perf_counter()
            for token in llm.generate(prompt_ids.tolist(), reset=True, **self._sampler_options()):
                tokens.append(int(token))
                if token in self.eos_ids or len(tokens) >= max_new_tokens:
                    break
            seconds = time.perf_counter() - start
        finally:
            del llm.eval
        marks = tokens_at_eval + [len(tokens)]
        return MethodRun(tokens, seconds, [b - a for a, b in zip(marks, marks[1:]) if b > a])

    def _sampler_options(self) -> dict:
        if self.sampling is None:
            return {"top_k": 1, "temp": 0.0}
        s = self.sampling
        return {"temp": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p or 0.0}


class MethodFactory:
    """Builds the methods of one dtype, loading each shared piece (model, runners, llama.cpp) once."""

    def __init__(
        self,
        model: str,
        dtype: str,
        draft_model: str | None = None,
        pld_tokens: int = 5,
        pld_ngram: int = 2,
        llamacpp_pld_tokens: int = 3,
        draft: str | None = None,
        datastore: str | None = None,
        device: torch.device = torch.device("cpu"),
    ):
        self.model_spec = model
        self.device = device
        self.datastore = datastore
        self.draft = draft  # for sps and rsd; None: an early exit after a quarter of the layers
        self.dtype = dtype
        self.draft_model = draft_model
        self.pld = {"prompt_lookup_num_tokens": pld_tokens, "max_matching_ngram_size": pld_ngram}
        self.llamacpp_pld = {"num_pred_tokens": llamacpp_pld_tokens, "max_ngram_size": pld_ngram}
        self._quantized: dict[str, Engine] = {}

    @cached_property
    def engine(self) -> Engine:
        return Engine(self.model_spec, dtype=self.dtype, device=self.device)

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.loaded

    @cached_property
    def hf_engine(self) -> Engine:
        return Engine(self.loaded, dtype=self.engine.dtype, runner="hf")

    def quantized_engine(self, quantize: str) -> Engine:
        """The model with `quantize` weights (int4, gguf), loaded once for all the methods on it."""
        if quantize not in self._quantized:
            if self.engine.dtype != "bfloat16":
                raise MethodUnavailable(f"{quantize} weights need bfloat16 activations")
            if self.engine.runner.kind is not RunnerKind.FAST:
                raise MethodUnavailable(f"{quantize} weights need the fast runner, which does not run this model")
            self._quantized[quantize] = Engine(self.model_spec, dtype="bfloat16", device=self.device, quantize=quantize)
        return self._quantized[quantize]

    def cost_runners(self, methods: list[Method]) -> dict:
        """The runners behind the methods, for the cost curve: the transformers runner always."""
        runners = {"hf": HFRunner(self.loaded.model)}
        if self.engine.runner.kind is RunnerKind.FAST:
            runners["fast"] = self.engine.runner
        for quantize in ("int4", "gguf"):
            if any(m.name.startswith(quantize) for m in methods):
                runners[f"fast {quantize}"] = self.quantized_engine(quantize).runner
        return runners

    def build(self, base: str, tree: str | None = None, name: str | None = None, sampling: Sampling | None = None) -> Method:
        """Method `base` (on `tree`, for the Token Recycling methods), named `name` (default:
        `base`), greedy or with `sampling`, complete as built."""
        builder = getattr(self, "_" + base.replace("-", "_"), None)
        if base not in BASE_METHODS or builder is None:
            raise MethodUnavailable(f"unknown method '{base}' (known: {', '.join(BASE_METHODS)})")
        variant = Variant.of(name or base, sampling)
        return builder(variant, tree) if base in TREE_METHODS else builder(variant)

    # ---- one builder per method --------------------------------------------------------------
    def _ar(self, v: Variant):
        return self._transformers(v, None, "transformers model.generate", {})

    def _plain(self, v: Variant):
        description = f"tokenrecycle, one token per step ({self.engine.describe().runner_text()})"
        return OwnLoopMethod(v.name, v.baseline(REFERENCE), description, sampling=v.sampling, engine=self.engine)

    def _tr(self, v: Variant, tree):
        return self._recycling(v, self.engine, tree, hot=True, baseline="plain")

    def _tr_cold(self, v: Variant, tree):
        return self._recycling(v, self.engine, tree, hot=False, baseline="plain")

    def _tr_hf(self, v: Variant, tree):
        return self._recycling(v, self.hf_engine, tree, hot=True, baseline=REFERENCE)

    def _int4_plain(self, v: Variant):
        return self._quantized_plain(v, "int4")

    def _int4_tr(self, v: Variant, tree):
        return self._recycling(v, self.quantized_engine("int4"), tree, hot=True, baseline="int4-plain")

    def _int4_auto(self, v: Variant):
        return self._auto(v, self.quantized_engine("int4"), baseline="int4-plain")

    def _gguf_plain(self, v: Variant):
        return self._quantized_plain(v, "gguf")

    def _gguf_tr(self, v: Variant, tree):
        return self._recycling(v, self.quantized_engine("gguf"), tree, hot=True, baseline="gguf-plain")

    def _gguf_auto(self, v: Variant):
        return self._auto(v, self.quantized_engine("gguf"), baseline="gguf-plain")

    def _quantized_plain(self, v: Variant, quantize: str) -> OwnLoopMethod:
        engine = self.quantized_engine(quantize)
        description = f"tokenrecycle, one token per step, {quantize} weights ({engine.describe().runner_text()})"
        return OwnLoopMethod(v.name, v.baseline(REFERENCE), description, {"quantize": quantize}, v.sampling, engine=engine)

    def _sps(self, v: Variant):
        return self._draft_model(v, "chain", kind="speculative sampling, adaptive chain")

    def _rsd(self, v: Variant):
        return self._draft_model(v, "2,2,1", kind="recursive speculative decoding, tree 2-2-1")

    def _rsd_sbs(self, v: Variant):
        return self._draft_model(v, "beam:3,3", kind="recursive speculative decoding, stochastic beam search 3x3")

    def _draft_model(self, v: Variant, shape: str, kind: str) -> OwnLoopMethod:
        engine = self.engine
        draft = self.draft or f"early-exit:{max(1, engine.loaded.model.config.num_hidden_layers // 4)}"
        drafter = engine.build_drafter("draft-model", draft=draft, draft_shape=shape)
        shown = portable_path(draft)  # a draft model's name, not where it lies
        parsed = DraftShape.parse(shape)
        settings = {"draft": shown, "branching": list(parsed.branching), "adaptive_length": parsed.adaptive, "beam": parsed.beam}
        description = f"{kind}, drafts from {shown}"
        return OwnLoopMethod(v.name, v.baseline("plain"), description, settings, v.sampling, engine=engine, drafter=drafter)

    def _lookup(self, v: Variant):
        return self._train_free(v, "lookup", "prompt lookup, continuations merged in a tree")

    def _retrieval(self, v: Variant):
        return self._train_free(v, "retrieval", "retrieval from a suffix automaton of the datastore, prompts and earlier outputs")

    def _merged(self, v: Variant):
        return self._train_free(v, "merged", "Token Recycling, lookup and retrieval merged in one tree")

    def _auto(self, v: Variant, engine: Engine | None = None, baseline: str = "plain"):
        description = "a bandit choosing among Token Recycling, lookup, retrieval and their merges"
        return self._train_free(v, "auto", description, engine, baseline)

    def _train_free(self, v: Variant, kind: str, description: str, engine: Engine | None = None, baseline: str = "plain") -> OwnLoopMethod:
        # Each retrieving method reads the file into an automaton of its own: it learns as it runs.
        engine = engine or self.engine
        retrieves = kind in ("retrieval", "merged", "auto")
        store = SuffixAutomaton.load(self.datastore) if self.datastore and retrieves else None
        drafter = engine.build_drafter(kind, datastore=store)
        settings = {"drafter": kind, "tree": engine.tree.name}
        if retrieves:
            datastore = self.datastore and portable_path(self.datastore)
            settings.update(datastore=datastore, datastore_tokens=store.tokens if store else 0)
        if isinstance(drafter, AutoDrafter):
            settings["arms"] = drafter.arm_names
        if engine.quantize:
            settings["quantize"] = engine.quantize
        return OwnLoopMethod(v.name, v.baseline(baseline), description, settings, v.sampling, engine=engine, drafter=drafter)

    def _hf_pld(self, v: Variant):
        return self._transformers(v, REFERENCE, "transformers prompt lookup decoding", dict(self.pld))

    def _hf_assisted(self, v: Variant):
        if not self.draft_model:
            raise MethodUnavailable("needs a draft model that shares the tokenizer (--draft-model)")
        draft = load_model(self.draft_model, self.engine.dtype, self.device)
        shown = portable_path(self.draft_model)
        if draft.tokenizer.get_vocab() != self.loaded.tokenizer.get_vocab():
            raise MethodUnavailable(f"draft model {shown} does not share the target's tokenizer")
        return self._transformers(
            v, REFERENCE, f"transformers assisted decoding, draft {shown}",
            {"assistant_model": draft.model}, settings={"draft_model": shown},
        )  # fmt: skip

    def _llamacpp(self, v: Variant):
        return self._llama(v, REFERENCE, "llama.cpp greedy decoding of the GGUF", {})

    def _llamacpp_pld(self, v: Variant):
        module = self._llama_cpp_module()
        drafter = module.llama_speculative.LlamaPromptLookupDecoding(**self.llamacpp_pld)
        # Speculative checks need the logits of every position, not only the last one.
        options = {"draft_model": drafter, "logits_all": True}
        return self._llama(v, "llamacpp", "llama.cpp prompt lookup decoding", options, dict(self.llamacpp_pld))

    # ---- shared pieces ---------------------------------------------------------------------
    def _transformers(self, v: Variant, baseline, description, options, settings=None) -> TransformersMethod:
        shown = {key: value for key, value in options.items() if isinstance(value, (int, float, str))}
        return TransformersMethod(
            v.name, v.baseline(baseline), description, settings or shown, v.sampling,
            model=self.loaded.model, eos_ids=self.engine.eos_ids, options=options,
        )  # fmt: skip

    def _recycling(self, v: Variant, engine: Engine, tree, hot: bool, baseline: str) -> OwnLoopMethod:
        choice = engine.resolve(tree) if tree else engine.tree
        drafter = engine.recycling_drafter(choice, hot_start=hot)
        start = "hot start (table kept across requests)" if hot else "cold start (table restarted per request)"
        settings = {"tree": choice.name, "nodes": drafter.template.num_nodes, "depth": drafter.template.max_depth}
        if tree is None or choice.name in TUNED:
            settings["tree_reason"] = choice.reason
        if drafter.budget is None and not isinstance(drafter, AdaptiveTreeDrafter):  # the same tree every step
            settings["paths"] = [list(path) for path in drafter.template.paths[1:]]
        runner = engine.describe().runner_text()
        settings.update(hot_start=hot, topk=engine.topk, runner=engine.runner.kind.value)
        return OwnLoopMethod(
            v.name, v.baseline(baseline), f"Token Recycling, tree {choice.name}, {start}, {runner}", settings,
            v.sampling, engine=engine, drafter=drafter,
        )  # fmt: skip

    def _llama(self, v: Variant, baseline, description, options, settings=None) -> LlamaCppMethod:
        if self.device.type != "cpu":
            raise MethodUnavailable(f"llama-cpp-python is built for the CPU here: no row beside a model on {self.device}")
        module = self._llama_cpp_module()
        gguf = resolve(self.model_spec)
        if gguf.suffix != ".gguf":
            raise MethodUnavailable(f"llama.cpp needs a GGUF model, not {portable_path(gguf)}")
        llm = module.Llama(
            model_path=str(gguf), n_ctx=self.engine.runner.max_context, n_threads=torch.get_num_threads(),
            verbose=False, **options,
        )  # fmt: skip
        settings = {"gguf": Path(gguf).name, "threads": torch.get_num_threads(), **(settings or {})}
        return LlamaCppMethod(
            v.name, v.baseline(baseline), description, settings, v.sampling, llm=llm, eos_ids=self.engine.eos_ids
        )  # fmt: skip

    @staticmethod
    def _llama_cpp_module():
        try:
            import llama_cpp
            import llama_cpp.llama_speculative  # noqa: F401
        except ImportError:
            raise MethodUnavailable("llama-cpp-python is not installed (make llamacpp)") from None
        return llama_cpp


def method_names(methods: list[str], trees: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(name, base method, tree) for each method asked for: tree methods once per tree, named
    base@tree when several trees are compared."""
    expanded = []
    for base in methods:
        if base in TREE_METHODS and trees:
            for tree in trees:
                expanded.append((base if len(trees) == 1 else f"{base}@{tree}", base, tree))
        else:
            expanded.append((base, base, None))
    return expanded
