"""The engine: one loaded model and runner holding many requests at once.

It owns what requests share: the model, the runner and its KV-cache slots, the EOS ids, prompt
encoding and the fit checks, the tree and the Token Recycling table, and one `describe()` of the
setup. `submit` queues a request; each `step` admits waiting requests to free slots and advances
every running request by one forward pass; `Request.cancel` takes effect before the next step.

Batching (on by default where the runner batches: the fast runner). A step runs the trees of all
running requests as one forward pass, plus chunks of the prompts of requests that just joined
(`prefill_chunk` tokens each, so a long prompt does not hold the others up for its whole
prefill), at most `max_batch_tokens` tokens in all. Each request's tree is cut to the nodes the
batch's tree budget gives it (budget.py: expected accepted tokens per second of the pass). A
request's output never depends on what shares its pass: each keeps its own verifier, draws and
stop conditions, the runner gives each row the same result whatever else is in the pass, and a
prompt's chunk boundaries depend on its own length only. Without batching (`batching=False`, or
the transformers runner) the requests run one pass each, one after another.

Slots and memory: `max_slots` sequences run at once (default 4), each with its own KV cache,
sized for its prompt, its max_new_tokens and one step's tree; `cache_tokens` caps the cached
tokens of all running requests together (default: max_slots x the context window). A request
that cannot start now waits, first come first served, up to `max_waiting` of them (default 64);
one more raises EngineBusyError; one that could never fit raises PromptTooLongError at submit.

The Token Recycling table is shared by all requests by default (hot start: every verified node
of every request improves everyone's drafts, and a request's output never depends on the drafts,
only its speed); `shared_table=False` gives each request a table of its own, seeded from its
prompt (cold start, the paper's per-request behaviour).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .budget import AcceptanceRates, PassCost, allocate, equal_shares, trim
from .decoding import GREEDY, DecodingLoop
from .drafters import Drafter, TokenRecyclingDrafter
from .drafters.adaptive import AdaptiveTreeDrafter
from .drafters.draft_model import DraftShape
from .drafters.recycling import check_topk
from .drafters.registry import DEFAULT_DRAFTER, DraftResources, build_drafter, drafter_entry
from .errors import EngineBusyError, InvalidOptionError, PromptTooLongError
from .devices import resolve_device
from .hardware import choose_dtype
from .models import BUNDLED, DEFAULT_MODEL, LoadedModel, load_model
from .prompts import Prompt, encode_prompt, eos_token_ids
from .request import GenerationResult, Request, RequestSettings, RequestState, Update
from .trees import DraftTree
from .runners import DEFAULT_SLOTS, FastRunner, check_runner_options, make_runner
from .runners.fast import TREE_SLOTS
from .text import OutputAssembler
from .trees.choice import TUNED, TreeChoice, default_tree, resolve_tree, tuned_tree
from .tuning import ProfileKey, read_profile
from .verify import SamplingVerifier

DEFAULT_MAX_WAITING = 64
DEFAULT_MAX_BATCH_TOKENS = 256
DEFAULT_PREFILL_CHUNK = 64  # measured: bench-results/batching-prefill.md, docs/batching.md


@dataclass(frozen=True)
class Setup:
    """What an engine runs, and why: the one description the CLI, the bench, tuning and the
    server show."""

    model: str
    dtype: str
    dtype_reason: str
    device: str
    runner: str
    loop: str
    loop_note: str | None
    quantize: str | None
    tree: str
    tree_reason: str
    tree_nodes: int
    tree_depth: int
    drafter: str
    topk: int
    shared_table: bool
    max_slots: int
    threads: int
    weights_bytes: int
    kv_cache_bytes: int
    table_bytes: int
    batching: str = "off"

    def to_dict(self) -> dict:
        return asdict(self)

    def runner_text(self) -> str:
        return f"{self.runner} runner ({self.loop}{f': {self.loop_note}' if self.loop_note else ''})"

    def summary(self) -> str:
        """One line: dtype and why, runner and loop, tree."""
        weights = f" · {self.quantize} weights" if self.quantize else ""
        return f"{self.dtype} ({self.dtype_reason}){weights} on {self.device} · {self.runner_text()} · tree {self.tree}"


class Engine:
    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str | torch.device = "auto",
        runner: str = "auto",
        quantize: str | None = None,
        tree: str | Sequence[Sequence[int]] | None = "auto",
        topk: int = 8,
        shared_table: bool = True,
        max_slots: int = DEFAULT_SLOTS,
        cache_tokens: int | None = None,
        max_waiting: int = DEFAULT_MAX_WAITING,
        batching: bool = True,
        max_batch_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        tree_budget: bool = True,
    ):
        # Every option is checked by its owner before the model loads, so a typo fails in milliseconds.
        check_topk(topk)
        self.device = _device_for(model, device)
        picked = choose_dtype(dtype, self.device)
        check_runner_options(runner, quantize, picked.dtype, max_slots)
        tree = "auto" if tree is None else tree
        asked_tree = None if isinstance(tree, str) and tree in TUNED else resolve_tree(tree, topk)
        _check_count("max_waiting", max_waiting, minimum=0)
        if cache_tokens is not None:
            _check_count("cache_tokens", cache_tokens, minimum=1)
        _check_count("prefill_chunk", prefill_chunk, minimum=1)
        max_batch_tokens = _batch_tokens(max_batch_tokens, prefill_chunk, max_slots)
        if isinstance(model, LoadedModel) and model.dtype != picked.dtype:
            raise InvalidOptionError(f"the loaded model is {model.dtype}, not {picked.dtype}")
        # A LoadedModel is shared, not copied: several engines (runners, trees) over one model.
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, picked.dtype, self.device)
        self.dtype, self.dtype_reason = picked.dtype, picked.reason
        self.quantize, self.topk, self.shared_table = quantize, topk, shared_table
        gguf = self.loaded.path if quantize == "gguf" else None
        self.runner = make_runner(self.loaded.model, runner, quantize, max_slots, gguf=gguf)
        self.eos_ids = eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        self.cache_tokens = cache_tokens or max_slots * (self.runner.max_context + TREE_SLOTS)
        self.max_waiting = max_waiting
        self.profile_key = ProfileKey.of(self.loaded.path, self.runner, self.dtype, quantize, topk)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._draft_runners: dict[str, object] = {}
        self.set_tree(tree if asked_tree is None else asked_tree)
        self.batching = bool(batching) and self.runner.batches
        self.max_batch_tokens, self.prefill_chunk = max_batch_tokens, prefill_chunk
        self.tree_budget = tree_budget  # False: every tree whole, or equal shares of the bound
        self.acceptance = AcceptanceRates()  # over all requests: each request's rates start from it
        self._rates: dict[str, AcceptanceRates] = {}

    # ---- the tree and the shared table -------------------------------------------------------
    def set_tree(self, tree: str | Sequence[Sequence[int]] | TreeChoice | None = "auto") -> None:
        """Draft with another tree (a name, dynN, a file, rank paths, auto or adaptive); the
        shared table starts empty. Only between requests."""
        if self._running:
            raise InvalidOptionError("the tree cannot change while requests are running")
        tree = "auto" if tree is None else tree
        self.tree = self.resolve(tree)
        self.recycling = self._new_recycling(self.tree)
        # The batch budget's cost curve: the profile's (read fresh: a tuning has just written it),
        # unless resolving a tuned tree read it already.
        profile = self.tree.profile or read_profile(self.profile_key)[0]
        self.pass_cost = PassCost(profile.mean_cost_ms if profile else None)

    def resolve(self, tree) -> TreeChoice:
        """A tree as the user names it (name, dynN, file, rank paths, auto, adaptive) for this engine."""
        if isinstance(tree, TreeChoice):
            return tree
        if isinstance(tree, str) and tree in TUNED:
            profile, problem = read_profile(self.profile_key)
            return tuned_tree(tree, self.topk, profile, default_tree(self.dtype, self.quantize), problem)
        return resolve_tree(tree, self.topk)

    def _new_recycling(self, choice: TreeChoice, hot_start: bool = True) -> TokenRecyclingDrafter:
        vocab = self.runner.vocab_size
        if choice.adaptive:
            profile = choice.profile
            return AdaptiveTreeDrafter(vocab, profile.rates, profile.mean_cost_ms, self.topk, hot_start)
        return TokenRecyclingDrafter(vocab, choice.template, self.topk, hot_start, budget=choice.budget)

    def recycling_drafter(self, tree=None, hot_start: bool = True) -> TokenRecyclingDrafter:
        """A Token Recycling drafter with a table of its own: this engine's tree unless another is
        given (a name, dynN, file, rank paths, auto or adaptive)."""
        return self._new_recycling(self.tree if tree is None else self.resolve(tree), hot_start)

    # ---- drafters ----------------------------------------------------------------------------
    def build_drafter(self, name: str, *, datastore=None, draft: str | None = None, draft_shape: str = "chain", own_table: bool = True) -> Drafter:
        """A drafter from the registry, with state of its own (`own_table=False`: its Token
        Recycling part drafts from this engine's shared table)."""
        entry = drafter_entry(name)
        shape = DraftShape.parse(draft_shape) if entry.needs_draft_model else None
        resources = DraftResources(
            vocab_size=self.runner.vocab_size,
            tree=self.tree,
            recycling=self.recycling_drafter if own_table else self._request_recycling,
            datastore=datastore,
            draft_runner=(lambda: self.draft_runner(draft)) if draft else None,
            draft_shape=shape,
        )
        return entry.build(resources)

    def _request_recycling(self) -> TokenRecyclingDrafter:
        """The Token Recycling drafter a request gets: the shared one where it can serve (an
        adaptive tree follows one request at a time), else one of its own."""
        if self.shared_table and not self._in_use(self.recycling):
            return self.recycling
        return self._new_recycling(self.tree, hot_start=self.shared_table)

    def _in_use(self, drafter: Drafter) -> bool:
        """Whether a drafter holding one text's state already serves an unfinished request."""
        return not drafter.shareable and any(r.drafter is drafter for r in (*self._running, *self._waiting))

    def draft_runner(self, draft: str):
        """The draft model's runner, built once per engine: `early-exit:N` (this model's first N
        layers with its final norm and LM head, sharing its weights), `int4` (a 4-bit copy) or a
        model that shares the tokenizer (bundled name, GGUF file or directory)."""
        if draft not in self._draft_runners:
            self._draft_runners[draft] = self._make_draft_runner(draft)
        return self._draft_runners[draft]

    def _make_draft_runner(self, draft: str):
        kind, _, layers = draft.partition(":")
        slots = self.runner.max_slots
        if kind == "early-exit":
            if not layers.isdigit():
                raise InvalidOptionError(f"early-exit needs a layer count, as in early-exit:8, got '{draft}'")
            return FastRunner(self.loaded.model, layers=int(layers), max_slots=slots)
        if draft == "int4":
            return make_runner(self.loaded.model, "fast", quantize="int4", max_slots=slots)
        loaded = load_model(draft, self.dtype, self.device)
        if loaded.tokenizer.get_vocab() != self.loaded.tokenizer.get_vocab():
            raise InvalidOptionError(f"draft model {draft} does not share the target's tokenizer")
        return make_runner(loaded.model, max_slots=slots)

    # ---- prompts -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def encode(self, prompt: Prompt, chat: bool | None = None) -> np.ndarray:
        return encode_prompt(self.loaded.tokenizer, prompt, chat, self.runner.vocab_size)

    def check_fits(self, prompt_ids: np.ndarray, max_new_tokens: int) -> None:
        limit = self.runner.max_context
        if len(prompt_ids) + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the context window of {limit} tokens"
            )
        if self._reservation(len(prompt_ids), max_new_tokens) > self.cache_tokens:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} needs more "
                f"KV cache than this engine has ({self.cache_tokens} tokens)"
            )

    @staticmethod
    def _reservation(prompt_tokens: int, max_new_tokens: int) -> int:
        return prompt_tokens + max_new_tokens + TREE_SLOTS

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt: Prompt, settings: RequestSettings | None = None) -> Request:
        """Queue a request (encoded once, checked to fit); it starts at a step with a free slot."""
        settings = settings or RequestSettings()
        prompt_ids = self.encode(prompt, settings.chat)
        self.check_fits(prompt_ids, settings.max_new_tokens)
        assembler = OutputAssembler(self.loaded.tokenizer, self.eos_ids, settings.stop, settings.max_new_tokens)
        request = Request(prompt_ids, settings, self._drafter_for(settings), assembler)
        self._waiting.append(request)
        self._admit()
        if len(self._waiting) > self.max_waiting:
            self._waiting.remove(request)
            raise EngineBusyError(f"all {self.runner.max_slots} slots are busy and {self.max_waiting} requests already wait")
        return request

    def _drafter_for(self, settings: RequestSettings) -> Drafter:
        drafter = settings.drafter
        if drafter is None or isinstance(drafter, str):
            return self.build_drafter(drafter or DEFAULT_DRAFTER, own_table=False)
        if self._in_use(drafter):
            raise InvalidOptionError("this drafter object already serves an unfinished request (it holds one text's state)")
        return drafter

    def complete(self, prompt: Prompt, settings: RequestSettings | None = None) -> GenerationResult:
        """Submit a request and step the engine until it ends; its result."""
        request = self.submit(prompt, settings)
        for _ in self.run(request):
            pass
        return request.result

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    def step(self) -> list[Update]:
        """Apply cancellations, admit waiting requests, then one forward pass for all running
        requests (batching) or one per request."""
        self.drop_cancelled()
        self._admit()
        updates = self._batched_step() if self.batching else [self._advance(r) for r in self._running]
        for update in updates:
            if update.finished:
                self._close(update.request)
        return updates

    def _advance(self, request: Request) -> Update:
        try:
            return request.take(request.loop.step())
        except Exception as exc:  # one request's failure ends it, not the others
            return self._failed(request, exc)

    @staticmethod
    def _failed(request: Request, error: Exception) -> Update:
        request.fail(error)
        return Update(request, [], "", True, None)

    # ---- batching ----------------------------------------------------------------------------
    def _batched_step(self) -> list[Update]:
        started = time.perf_counter()
        plan, updates = self._plan()
        results = self._forward([(request.slot, tree) for request, tree in plan])
        for (request, tree), logits in zip(plan, results):
            update = self._failed(request, logits) if isinstance(logits, Exception) else self._decide(request, tree, logits)
            if update is not None:
                updates.append(update)
        if plan and not any(isinstance(logits, Exception) for logits in results):
            # The whole step is timed, drafting and verification included: their cost grows with
            # the nodes too, and a step is what a request waits for.
            self.pass_cost.observe(sum(len(tree) for _, tree in plan), time.perf_counter() - started)
        return updates

    def _plan(self) -> tuple[list[tuple[Request, DraftTree]], list[Update]]:
        """This step's pass: prompt chunks of joining requests, then every decoding request's tree
        cut by the budget; and the updates of requests that failed while drafting."""
        decoding = [r for r in self._running if not r.loop.prefilling]
        chunks, failed = self._prompt_chunks(self.max_batch_tokens - len(decoding))
        trees = []
        for request in decoding:
            try:
                trees.append((request, request.loop.next_tree()))
            except Exception as exc:
                failed.append(self._failed(request, exc))
        return chunks + self._cut(trees, sum(len(chunk) for _, chunk in chunks)), failed

    def _prompt_chunks(self, room: int) -> tuple[list[tuple[Request, DraftTree]], list[Update]]:
        """The next chunk of each joining prompt, first come first served, as many as fit in `room`
        (max_batch_tokens >= prefill_chunk + max_slots: the first always fits)."""
        chunks, failed = [], []
        for request in (r for r in self._running if r.loop.prefilling):
            size = min(self.prefill_chunk, len(request.prompt_ids) - request.loop.fed)
            if size > room:
                break
            try:
                chunks.append((request, request.loop.prompt_chunk(size)))
                room -= size
            except Exception as exc:
                failed.append(self._failed(request, exc))
        return chunks, failed

    def _cut(self, trees: list[tuple[Request, DraftTree]], chunk_tokens: int) -> list[tuple[Request, DraftTree]]:
        """Each tree cut to the nodes the budget gives it (or to equal shares, without the budget).
        A request with the pass to itself keeps its drafter's tree: that tree is already sized for a
        pass of its own (tuned to this machine), and the budget is for sharing one."""
        alone = len(trees) == 1 and chunk_tokens == 0
        if self.tree_budget and not alone:
            chances = [self._rates[request.id].chances(tree) for request, tree in trees]
            keep = allocate(chances, chunk_tokens, self.pass_cost, self.max_batch_tokens)
        else:
            keep = equal_shares([len(tree) for _, tree in trees], chunk_tokens, self.max_batch_tokens)
        # Trees of sampled drafts are kept whole: how many draws their verification takes depends
        # on the tree, so a cut one would give other samples than the request alone.
        return [(r, tree if tree.draft_probs is not None else trim(tree, k)) for (r, tree), k in zip(trees, keep)]

    def _forward(self, items: list[tuple[int, DraftTree]]) -> list[torch.Tensor | Exception]:
        """One pass for all items; if it fails, each item alone, so that only the request whose
        tree fails ends (nothing is committed by a forward pass, so running again is safe)."""
        if not items:
            return []
        try:
            return self.runner.forward_batch(items)
        except Exception:
            return [_or_error(self.runner.forward_tree, slot, tree) for slot, tree in items]

    def _decide(self, request: Request, tree: DraftTree, logits: torch.Tensor) -> Update | None:
        try:
            was_prefilling = request.loop.prefilling
            step = request.loop.decide(tree, logits)
            if step is None:  # a prompt chunk before the last
                return None
            if not was_prefilling:
                self._rates[request.id].observe(tree, step.accepted)
            return request.take(step)
        except Exception as exc:
            return self._failed(request, exc)

    def run(self, request: Request):
        """Step the engine until `request` ends; yields its updates (others advance meanwhile) and
        raises the error that ended it, if one did."""
        while not request.finished:
            if request.state is RequestState.WAITING and not self._running:
                raise EngineBusyError("the request cannot start: its slot is held outside the engine")
            for update in self.step():
                if update.request is request:
                    yield update
        if request.error is not None:
            raise request.error

    def drop_cancelled(self) -> None:
        """End the requests whose cancel was asked for and free their slots (each step does this first)."""
        for request in [r for r in self._waiting if r.cancel_asked]:
            self._waiting.remove(request)
            request.end(RequestState.CANCELLED)
        for request in [r for r in self._running if r.cancel_asked]:
            request.end(RequestState.CANCELLED)
            self._close(request)

    def _admit(self) -> None:
        while self._waiting and self._can_start(self._waiting[0].prompt_ids, self._waiting[0].settings):
            request = self._waiting.popleft()
            slot = self.runner.allocate()
            verifier = SamplingVerifier(request.settings.sampling) if request.settings.sampling else GREEDY
            loop = DecodingLoop(self.runner, slot, request.drafter, request.prompt_ids, request.settings.max_new_tokens, verifier)
            request.start(loop, slot)
            self._rates[request.id] = AcceptanceRates(prior=self.acceptance)
            self._running.append(request)

    def _can_start(self, prompt_ids: np.ndarray, settings: RequestSettings) -> bool:
        reserved = sum(self._reservation(len(r.prompt_ids), r.settings.max_new_tokens) for r in self._running)
        needed = self._reservation(len(prompt_ids), settings.max_new_tokens)
        return self.runner.free_slots > 0 and reserved + needed <= self.cache_tokens

    def _close(self, request: Request) -> None:
        self._running.remove(request)
        self._rates.pop(request.id, None)
        self.runner.release(request.slot)
        request.drafter.finish()

    # ---- description -------------------------------------------------------------------------
    def describe(self, drafter: str = DEFAULT_DRAFTER) -> Setup:
        template = self.tree.template
        return Setup(
            model=self.loaded.name if self.loaded.name in BUNDLED else self.loaded.path.name,
            dtype=self.dtype,
            dtype_reason=self.dtype_reason,
            device=str(self.device),
            runner=self.runner.kind.value,
            loop=self.runner.loop.value,
            loop_note=self.runner.loop_note,
            quantize=self.quantize,
            tree=self.tree.name,
            tree_reason=self.tree.reason,
            tree_nodes=template.num_nodes,
            tree_depth=template.max_depth,
            drafter=drafter,
            topk=self.topk,
            shared_table=self.shared_table,
            max_slots=self.runner.max_slots,
            threads=torch.get_num_threads(),
            weights_bytes=sum(p.numel() * p.element_size() for p in self.loaded.model.parameters()),
            kv_cache_bytes=self.runner.cache_bytes,
            table_bytes=self.recycling.memory_bytes,
            batching=self._batching_text(),
        )

    def _batching_text(self) -> str:
        if self.batching:
            return f"on: one pass of up to {self.max_batch_tokens} tokens a step, prompts in chunks of {self.prefill_chunk}"
        return "off" if self.runner.batches else f"off: the {self.runner.kind.value} runner runs one request a pass"


def _device_for(model: str | LoadedModel, spec: str | torch.device) -> torch.device:
    """The engine's device: the one asked for (auto: CUDA where there is a GPU); for a model
    already loaded, its own (auto), or the one asked for, which must be where it is."""
    if not isinstance(model, LoadedModel):
        return resolve_device(spec)
    loaded_on = model.model.device
    asked = loaded_on if str(spec) == "auto" else resolve_device(spec)
    if asked != loaded_on:
        raise InvalidOptionError(f"the loaded model is on {loaded_on}, not {asked}")
    return loaded_on


def _batch_tokens(asked: int | None, prefill_chunk: int, max_slots: int) -> int:
    """The step's token bound: it must hold a prompt chunk beside every slot's root, so that a
    joining prompt always makes progress (default: the larger of 256 and that)."""
    least = prefill_chunk + max_slots
    if asked is None:
        return max(DEFAULT_MAX_BATCH_TOKENS, least)
    _check_count("max_batch_tokens", asked, minimum=1)
    if asked < least:
        raise InvalidOptionError(
            f"max_batch_tokens must hold a prompt chunk and every slot's root: at least "
            f"prefill_chunk + max_slots = {least}, got {asked}"
        )
    return asked


def _or_error(function, *args):
    try:
        return function(*args)
    except Exception as exc:
        return exc


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidOptionError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
