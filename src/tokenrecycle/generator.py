"""The public API: load a model once, generate many times, streaming or not."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .decoding import GREEDY, speculative_decode
from .drafters import AdaptiveTreeDrafter, Drafter, PlainDrafter, TokenRecyclingDrafter
from .drafters.auto import AutoDrafter
from .drafters.draft_model import DraftModelDrafter
from .drafters.lookup import LookupDrafter
from .drafters.retrieval import RetrievalDrafter
from .errors import EmptyPromptError, InvalidOptionError, PromptTooLongError
from .hardware import auto_dtype
from .models import DEFAULT_MODEL, DTYPES, LoadedModel, load_model
from .runners import RUNNERS, FastRunner, make_runner
from .sampling import Sampling
from .text import OutputAssembler
from .trees.choice import ADAPTIVE, AUTO, TUNED, TreeChoice, default_tree, resolve_tree
from .trees import compile_template
from .verify import SamplingVerifier
from . import tuning
from .tuning import load_profile

QUANTIZE = (None, "int4")  # weight formats beside the dtype's own

# What a prompt may be: text (a user turn), chat messages ({"role", "content"} dicts, for
# multi-turn conversations) or token ids already encoded.
Prompt = str | Sequence[dict] | np.ndarray

@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    steps: int  # target-model forward passes that decided tokens, the prefill included
    seconds: float
    stop_reason: str
    accepted_lengths: list[int] = field(default_factory=list)  # tokens decided per step

    @property
    def mean_accepted(self) -> float:
        """Mean tokens decided per forward pass (MAT); exactly 1.0 for plain decoding."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_lengths).items()))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(mean_accepted=self.mean_accepted, tokens_per_s=self.tokens_per_s)
        return data

    def stats_line(self) -> str:
        return (
            f"{self.new_tokens} new tokens in {self.steps} steps · MAT {self.mean_accepted:.2f} · "
            f"{self.tokens_per_s:.1f} tokens/s ({self.seconds:.2f} s, stop: {self.stop_reason})"
        )


class Generation:
    """A streaming generation: iterate for text pieces; `result` is set when iteration ends."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


class Generator:
    """Loads a model once and decodes with Token Recycling; every output equals plain greedy decoding."""

    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        runner: str = "auto",
        tree: str | Sequence[Sequence[int]] | None = AUTO,
        topk: int = 8,
        hot_start: bool = True,
        quantize: str | None = None,
    ):
        if not isinstance(topk, int) or topk < 1:
            raise InvalidOptionError(f"topk must be at least 1, got {topk}")
        if dtype != "auto" and dtype not in DTYPES:
            raise InvalidOptionError(f"dtype must be auto or one of {', '.join(DTYPES)}, got '{dtype}'")
        if runner not in RUNNERS:
            raise InvalidOptionError(f"runner must be one of {', '.join(RUNNERS)}, got '{runner}'")
        if quantize not in QUANTIZE:
            raise InvalidOptionError(f"quantize must be one of {', '.join(map(str, QUANTIZE))}, got '{quantize}'")
        # Options are checked before the model is loaded, so a typo fails in milliseconds.
        self.dtype_reason = f"asked for {dtype}"
        if dtype == "auto":
            picked = auto_dtype()
            dtype, self.dtype_reason = picked.dtype, f"auto: {picked.reason}"
        if quantize is not None and runner == "hf":
            raise InvalidOptionError(f"quantize={quantize} needs the fast runner, not runner=hf")
        if quantize is not None and dtype != "bfloat16":
            raise InvalidOptionError(f"quantize={quantize} needs bfloat16 activations, not {dtype}")
        tree = AUTO if tree is None else tree
        choice = None if tree in TUNED else resolve_tree(tree, topk)  # a bad tree fails before the load
        if isinstance(model, LoadedModel) and model.dtype != dtype:
            raise InvalidOptionError(f"the loaded model is {model.dtype}, not {dtype}")
        # A LoadedModel is shared, not copied: several generators (runners, trees) over one model.
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.dtype = dtype
        self.quantize = quantize
        self.runner = make_runner(self.model, runner, quantize)
        self.runner_name = type(self.runner).__name__
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.hot_start = hot_start
        self.topk = topk
        self._install_drafter(tree, choice)

    def set_tree(self, tree: str | Sequence[Sequence[int]] | None = AUTO, topk: int | None = None) -> None:
        """Switch to another tree (named, dynN, file or paths; auto or None for the tuned or default
        tree); the table starts empty."""
        self.topk = topk or self.topk
        tree = AUTO if tree is None else tree
        self._install_drafter(tree, None if tree in TUNED else resolve_tree(tree, self.topk))

    def _install_drafter(self, tree, choice: TreeChoice | None) -> None:
        self.tree_reason, profile = "asked for", None
        if tree in TUNED:
            tree, choice, self.tree_reason, profile = self._tuned_tree(tree)
        self.tree_name = tree if isinstance(tree, str) else "custom"
        self.template = choice.template
        self._budget = choice.budget
        self._profile = profile  # what an adaptive tree (only named so with a profile) starts from
        self.drafter = self.new_drafter(hot_start=self.hot_start)

    def _tuned_tree(self, tree: str):
        """This machine's tuned tree, or the static default for the dtype when there is no
        profile: (name, choice, reason, profile)."""
        profile = load_profile(self)
        if profile is None:
            static = default_tree(self.dtype, self.quantize)
            reason = "static default: no tuning profile for this setup yet (run tokenrecycle tune)"
            return static, resolve_tree(static, self.topk), reason, None
        paths = [p for p in profile.plan.paths if max(p) < self.topk]
        adapting = " (start; it follows each request's acceptance)" if tree == ADAPTIVE else ""
        reason = f"tuned on this machine: {profile.summary()}{adapting}"
        return tree, TreeChoice(compile_template(paths, self.topk)), reason, profile

    def _adaptive_drafter(self, profile, hot_start: bool) -> AdaptiveTreeDrafter:
        return AdaptiveTreeDrafter(self.runner.vocab_size, profile.rates, profile.mean_cost_ms, self.topk, hot_start)

    def tune(self, seconds: float = 60.0, progress=None):
        """Measure this machine (cost curve, acceptance rates), save the profile, use its tree."""
        profile = tuning.tune(self, seconds, progress)
        self.set_tree(AUTO)
        return profile

    def draft_model_drafter(
        self, draft: str, branching: Sequence[int] = (1, 1, 1, 1), adaptive: bool = False, beam: int | None = None
    ) -> Drafter:
        """A drafter that samples drafts from a draft model (chain: branching of ones; RSD tree:
        wider levels; beam=W: a stochastic beam search of width W over len(branching) levels).
        `draft`: `early-exit:N` (this model's first N layers, its final norm and LM
        head, sharing its weights), `int4` (a 4-bit copy of this model) or a model that shares the
        tokenizer (bundled name, GGUF file or directory). Pass it to generate(drafter=...)."""
        return DraftModelDrafter(self._draft_runner(draft), branching, adaptive, beam=beam)

    def train_free_drafter(self, kind: str = "auto", datastore=None) -> Drafter:
        """A drafter of its own: `recycling` (this generator's tree), `lookup`, `retrieval`
        (from a SuffixAutomaton datastore, the prompts and earlier outputs), `merged` (all three
        in one tree) or `auto` (a bandit choosing among them and their merges by tokens/s)."""
        if kind == "recycling":
            return self.new_drafter(self.hot_start)
        if kind == "lookup":
            return LookupDrafter()
        if kind == "retrieval":
            return RetrievalDrafter(datastore)
        if kind not in ("auto", "merged"):
            raise InvalidOptionError(f"unknown drafter '{kind}' (recycling, lookup, retrieval, merged, auto)")
        drafters = {"tr": self.new_drafter(self.hot_start), "lookup": LookupDrafter(), "retrieval": RetrievalDrafter(datastore)}
        nodes = max(self.template.num_nodes, 1)
        everything = (("tr", "lookup", "retrieval"), nodes + 12)
        if kind == "merged":
            return AutoDrafter(drafters, [everything], adapt=False)
        arms = [(("tr",), nodes), (("lookup",), 8), (("tr", "lookup"), nodes + 6), everything]
        return AutoDrafter(drafters, arms)

    def _draft_runner(self, draft: str):
        kind, _, layers = draft.partition(":")
        if kind == "early-exit":
            if not layers.isdigit():
                raise InvalidOptionError(f"early-exit needs a layer count, as in early-exit:8, got '{draft}'")
            return FastRunner(self.model, layers=int(layers))
        if draft == "int4":
            return make_runner(self.model, "fast", quantize="int4")
        loaded = load_model(draft, self.dtype)
        if loaded.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise InvalidOptionError(f"draft model {draft} does not share the target's tokenizer")
        return make_runner(loaded.model)

    def new_drafter(self, hot_start: bool = True, tree: str | Sequence[Sequence[int]] | None = None) -> Drafter:
        """A Token Recycling drafter of its own (own table) for this runner: this generator's
        tree unless another is given. Pass it to generate(drafter=...)."""
        if tree is None:  # this generator's own tree
            if self.tree_name == ADAPTIVE:
                return self._adaptive_drafter(self._profile, hot_start)
            choice = TreeChoice(self.template, self._budget)
        elif tree in TUNED:
            name, choice, _, profile = self._tuned_tree(tree)
            if name == ADAPTIVE:
                return self._adaptive_drafter(profile, hot_start)
        else:
            choice = resolve_tree(tree, self.topk)
        return TokenRecyclingDrafter(self.runner.vocab_size, choice.template, self.topk, hot_start, budget=choice.budget)

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None) -> np.ndarray:
        """Token ids of a prompt; instruct models get their chat template unless chat=False.
        Messages without a chat template are joined as plain text; token ids pass through."""
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or len(prompt) == 0:
                raise EmptyPromptError("the prompt is empty")
            return prompt.astype(np.int64, copy=False)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or not all(str(m.get("content", "")).strip() for m in messages):
            raise EmptyPromptError("the prompt is empty")
        use_chat = self.tokenizer.chat_template is not None if chat is None else chat
        if use_chat:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def check_fits(self, prompt_ids: np.ndarray, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidOptionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        limit = self.runner.max_context
        if len(prompt_ids) + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the context window of {limit} tokens"
            )

    # ---- decoding ------------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        plain: bool = False,
        drafter: Drafter | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Decode with Token Recycling; plain=True decodes one token per forward pass on the same
        runner instead (the baseline that isolates the gain from drafting); `drafter` replaces
        this generator's own drafter for this call. Greedy unless `sampling` is given; then the
        output is a sample of exactly the distribution plain sampling has."""
        prompt_ids = self.encode(prompt, chat)
        self.check_fits(prompt_ids, max_new_tokens)
        drafter = PlainDrafter() if plain else drafter or self.drafter
        verifier = SamplingVerifier(sampling) if sampling is not None else GREEDY
        steps = speculative_decode(self.runner, drafter, prompt_ids, max_new_tokens, verifier)
        return Generation(self._assemble(steps, prompt_ids, max_new_tokens, stop))

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        plain: bool = False,
        drafter: Drafter | None = None,
        sampling: Sampling | None = None,
    ) -> GenerationResult:
        generation = self.stream(prompt, max_new_tokens, stop, chat, plain, drafter, sampling)
        for _ in generation:
            pass
        return generation.result

    def generate_plain(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        sampling: Sampling | None = None,
    ) -> GenerationResult:
        """Plain decoding with transformers' own `model.generate`: the reference and baseline
        (greedy, or sampling with the same settings; a seed seeds torch's global generator)."""
        prompt_ids = self.encode(prompt, chat)
        self.check_fits(prompt_ids, max_new_tokens)
        options = {}
        if sampling is not None:
            options = sampling.generate_options()
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        start = time.perf_counter()
        tokens = hf_generate(self.model, prompt_ids, max_new_tokens, self.eos_ids, **options)
        seconds = time.perf_counter() - start
        assembler = self._assembler(max_new_tokens, stop)
        assembler.add(tokens)
        return _result(assembler, prompt_ids, seconds, [1] * len(assembler.tokens))

    def _assemble(self, steps, prompt_ids, max_new_tokens, stop) -> Iterator[str]:
        assembler = self._assembler(max_new_tokens, stop)
        accepted: list[int] = []
        start = time.perf_counter()
        for step in steps:
            before = len(assembler.tokens)
            piece = assembler.add(step.tokens)
            accepted.append(len(assembler.tokens) - before)
            if piece:
                yield piece
            if assembler.done:
                break
        steps.close()
        return _result(assembler, prompt_ids, time.perf_counter() - start, accepted)

    def _assembler(self, max_new_tokens: int, stop: Sequence[str]) -> OutputAssembler:
        if isinstance(stop, str):
            stop = [stop]
        return OutputAssembler(self.tokenizer, self.eos_ids, list(stop), max_new_tokens)

    # ---- the recycling table -------------------------------------------------------------
    def save_table(self, path: str | Path) -> None:
        self.drafter.save(path)

    def load_table(self, path: str | Path) -> None:
        self.drafter.load(path)

    def reset_table(self) -> None:
        self.drafter.reset()


def _result(assembler: OutputAssembler, prompt_ids, seconds: float, accepted: list[int]) -> GenerationResult:
    return GenerationResult(
        text=assembler.text,
        token_ids=assembler.tokens,
        prompt_tokens=len(prompt_ids),
        new_tokens=len(assembler.tokens),
        steps=len(accepted),
        seconds=seconds,
        stop_reason=assembler.stop_reason or "length",
        accepted_lengths=accepted,
    )


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def hf_generate(
    model, prompt_ids: np.ndarray, max_new_tokens: int, eos_ids: set[int], **generate_options
) -> list[int]:
    """transformers' `model.generate`, greedy unless the options sample; options pass through
    (prompt lookup, assistant model, sampling settings)."""
    ids = torch.as_tensor(prompt_ids, device=model.device)[None]
    generate_options.setdefault("do_sample", False)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=min(eos_ids, default=0),
        **generate_options,
    )
    return out[0, len(prompt_ids) :].tolist()
