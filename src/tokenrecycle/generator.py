"""The public API for one request at a time: load a model once, generate many times, streaming
or not. A thin facade over one Engine; serving many requests at once uses the Engine itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .drafters import Drafter
from .engine import Engine
from .models import DEFAULT_MODEL, LoadedModel
from .prompts import Prompt
from .reference import hf_generate
from .request import GenerationResult, Request, RequestSettings
from .sampling import Sampling
from .text import OutputAssembler
from . import tuning


class TextStream:
    """A streaming generation: iterate for text pieces; `result` is set when iteration ends.
    Leaving the loop early cancels the request."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request = engine, request
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for update in self.engine.run(self.request):
                if update.text:
                    yield update.text
        finally:
            if not self.request.finished:
                self.request.cancel()
                self.engine.drop_cancelled()
            self.result = self.request.result


class Generator:
    """Loads a model once and decodes with Token Recycling; every output equals plain decoding's."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, *, hot_start: bool = True, **options):
        """`options`: the Engine's (dtype, runner, quantize, tree, topk, max_slots, ...). hot_start:
        the Token Recycling table is kept across requests (False: each starts its own from its prompt)."""
        self.engine = Engine(model, shared_table=hot_start, **options)

    @property
    def runner(self):
        return self.engine.runner

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    def encode(self, prompt: Prompt, chat: bool | None = None):
        return self.engine.encode(prompt, chat)

    def check_fits(self, prompt_ids, max_new_tokens: int) -> None:
        self.engine.check_fits(prompt_ids, max_new_tokens)

    def set_tree(self, tree: str | Sequence[Sequence[int]] | None = "auto") -> None:
        """Switch to another tree (named, dynN, file or paths; auto or None for the tuned or default
        tree); the table starts empty."""
        self.engine.set_tree(tree)

    def tune(self, seconds: float = tuning.DEFAULT_SECONDS, progress=None) -> tuning.Profile:
        """Measure this machine (cost curve, acceptance rates), save the profile, use its tree."""
        profile = tuning.tune(self.engine, seconds, progress)
        self.engine.set_tree("auto")
        return profile

    def build_drafter(self, name: str, **options) -> Drafter:
        """A drafter of its own from the registry (see Engine.build_drafter); pass it to generate(drafter=...)."""
        return self.engine.build_drafter(name, **options)

    # ---- decoding ------------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        drafter: str | Drafter | None = None,
        sampling: Sampling | None = None,
    ) -> TextStream:
        """Decode with Token Recycling (or `drafter`: a registry name such as "plain", one token per
        step on the same runner, or a Drafter object). Greedy unless `sampling` is given; then
        the output is a sample of exactly the distribution plain sampling has."""
        settings = RequestSettings(max_new_tokens, stop, sampling, drafter, chat)
        return TextStream(self.engine, self.engine.submit(prompt, settings))

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, stop: Sequence[str] = (), chat: bool | None = None,
                 drafter: str | Drafter | None = None, sampling: Sampling | None = None) -> GenerationResult:  # fmt: skip
        stream = self.stream(prompt, max_new_tokens, stop, chat, drafter, sampling)
        for _ in stream:
            pass
        return stream.result

    def generate_with_transformers(self, prompt: Prompt, max_new_tokens: int = 128, stop: Sequence[str] = (),
                                   chat: bool | None = None, sampling: Sampling | None = None) -> GenerationResult:  # fmt: skip
        """Plain decoding with transformers' own `model.generate`: the reference and baseline
        (greedy, or sampling with the same settings; a seed seeds torch's global generator)."""
        engine = self.engine
        prompt_ids = engine.encode(prompt, chat)
        engine.check_fits(prompt_ids, max_new_tokens)
        assembler = OutputAssembler(engine.tokenizer, engine.eos_ids, stop, max_new_tokens)
        options = sampling.generate_options() if sampling is not None else {}
        if sampling is not None and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        start = time.perf_counter()
        assembler.add(hf_generate(engine.loaded.model, prompt_ids, max_new_tokens, engine.eos_ids, **options))
        seconds = time.perf_counter() - start
        tokens = assembler.tokens
        return GenerationResult(assembler.text, tokens, len(prompt_ids), len(tokens), len(tokens), seconds,
                                assembler.stop_reason or "length", [1] * len(tokens))  # fmt: skip

    # ---- the shared recycling table ------------------------------------------------------
    def save_table(self, path: str | Path) -> None:
        self.engine.recycling.save(path)

    def load_table(self, path: str | Path) -> None:
        self.engine.recycling.load(path)

    def reset_table(self) -> None:
        self.engine.recycling.reset()
