"""Run a benchmark: every method on every question, interleaved per prompt, after warm-up.

All methods of a dtype run in one process on the same token ids. Per turn the methods take turns
in an order that rotates from prompt to prompt, so none always runs first (warmer caches) or last.
A multi-turn question continues, as in Spec-Bench, after the model's own answer: the reference
method's, so every method sees the same second prompt. Results are saved after every question
(atomically), so an interrupted run leaves a valid partial results.json.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cost import forward_costs
from ..devices import resolve_device
from ..errors import InvalidOptionError, PromptTooLongError, TokenRecycleError
from ..hardware import machine_info
from ..models import DEFAULT_MODEL
from ..sampling import Sampling
from ..engine import Engine
from ..tuning import load_profile
from .memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .methods import (
    BASE_METHODS,
    DEFAULT_METHODS,
    REFERENCE,
    Method,
    MethodFactory,
    MethodRun,
    MethodUnavailable,
    method_names,
)
from .metrics import temperature_suffix
from .progress import BenchProgress
from .questions import Question
from .report import render
from .results import (
    RESULTS_FILE, BenchRun, Machine, MethodInfo, Record, Section, Settings, load_results, portable_path, save_results,
)  # fmt: skip

WARM_UP_PROMPTS = ("Hello! How are you?", "Write a haiku about autumn.", "List three prime numbers.")
WARM_UP_TOKENS = 32


@dataclass
class BenchConfig:
    questions: list[Question]
    out: Path
    question_source: str = "default"
    model: str = DEFAULT_MODEL
    dtypes: tuple[str, ...] = ("auto",)
    device: str = "auto"  # every section's model runs there (devices.resolve_device)
    methods: tuple[str, ...] | None = None  # None: the default set, skipping what is unavailable
    trees: tuple[str, ...] | None = None  # None: each runner's default tree
    max_new_tokens: int = 128
    temperatures: tuple[float, ...] = (0.0,)  # 0: greedy; others sample (top-k 50, as transformers)
    repeats: int = 1
    draft_model: str | None = None  # for hf-assisted
    draft: str | None = None  # for sps and rsd: early-exit:N, int4 or a model; None: early exit at a quarter
    datastore: str | None = None  # for retrieval: a file from tokenrecycle index
    pld_tokens: int = 5
    pld_ngram: int = 2
    llamacpp_pld_tokens: int = 3
    warm_up: int = len(WARM_UP_PROMPTS)
    cost_curve: bool = True
    resume: bool = False  # continue the run in `out` (same settings, same CPU) from its last whole question
    progress: bool = True

    def check(self) -> None:
        resolve_device(self.device)
        if self.max_new_tokens < 1:
            raise InvalidOptionError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.repeats < 1:
            raise InvalidOptionError(f"--repeats must be at least 1, got {self.repeats}")
        if not self.questions:
            raise InvalidOptionError("no questions to run")
        if not self.temperatures:
            raise InvalidOptionError("--temperatures needs at least one temperature")
        for temperature in self.temperatures:
            Sampling.of(temperature)  # Sampling says what a temperature may be (0: greedy)
        unknown = [m for m in self.methods or () if m not in BASE_METHODS]
        if unknown:
            raise InvalidOptionError(f"unknown method '{unknown[0]}' (known: {', '.join(BASE_METHODS)})")

    def method_list(self) -> list[str]:
        """The methods to run, the reference first: it decides what a second turn follows."""
        asked = list(self.methods or DEFAULT_METHODS)
        return [REFERENCE] + [m for m in dict.fromkeys(asked) if m != REFERENCE]


def run_bench(config: BenchConfig) -> BenchRun:
    """Run every dtype section; write results.json (after each question) and the report.
    Ctrl-C or SIGTERM ends the run early: what was measured is kept, with status "interrupted"."""
    config.check()
    run = resumed_run(config) if config.resume else None
    run = run or BenchRun("running", now(), Machine(**machine_info(resolve_device(config.device))), settings_of(config))
    progress = BenchProgress(enabled=config.progress)
    try:
        with sigterm_interrupts():
            for dtype in config.dtypes:
                run_section(config, dtype, run, progress)
        run.status = "complete"
    except KeyboardInterrupt:
        run.status = "interrupted"
    finally:
        progress.close()
        # Nothing is written before the first measurement: a bad option leaves no file behind.
        if run.measured:
            save_results(run, config.out)
            render(config.out)
    return run


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def sigterm_interrupts():
    """While running, SIGTERM (kill, a job scheduler's stop) interrupts like Ctrl-C, so a stopped
    run is saved as interrupted (and can be resumed) instead of left "running"."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resumed_run(config: BenchConfig) -> BenchRun | None:
    """The earlier run in `out`, to be continued; None if there is none. Refused if its settings
    or its CPU differ: the rows of one report must come from one setup."""
    if not (config.out / RESULTS_FILE).is_file():
        return None
    run = load_results(config.out)
    if run.settings != settings_of(config):
        raise InvalidOptionError(f"cannot resume {config.out}: it was run with other settings")
    if run.machine.cpu != machine_info()["cpu"]:
        raise InvalidOptionError(f"cannot resume {config.out}: it was run on another CPU ({run.machine.cpu})")
    run.status = "running"
    run.resumed.append(now())
    return run


def settings_of(config: BenchConfig) -> Settings:
    """The config as results keep it: questions counted, paths made portable."""
    return Settings(
        out=portable_path(config.out),
        question_source=portable_path(config.question_source),  # a file, or the name of the default set
        model=portable_path(config.model),
        dtypes=tuple(config.dtypes),
        methods=tuple(config.methods) if config.methods is not None else None,
        trees=tuple(config.trees) if config.trees is not None else None,
        max_new_tokens=config.max_new_tokens,
        temperatures=tuple(config.temperatures),
        repeats=config.repeats,
        draft_model=config.draft_model and portable_path(config.draft_model),
        draft=config.draft and portable_path(config.draft),
        datastore=config.datastore and portable_path(config.datastore),
        pld_tokens=config.pld_tokens,
        pld_ngram=config.pld_ngram,
        llamacpp_pld_tokens=config.llamacpp_pld_tokens,
        warm_up=config.warm_up,
        cost_curve=config.cost_curve,
        questions=len(config.questions),
        turns=sum(len(q.turns) for q in config.questions),
        categories=tuple(dict.fromkeys(q.category for q in config.questions)),
        device=str(resolve_device(config.device)),
    )


def run_section(config: BenchConfig, dtype: str, run: BenchRun, progress: BenchProgress) -> None:
    start = time.perf_counter()
    factory = MethodFactory(
        config.model, dtype, config.draft_model, config.pld_tokens, config.pld_ngram, config.llamacpp_pld_tokens,
        config.draft, config.datastore, resolve_device(config.device),
    )  # fmt: skip
    before = current_rss_bytes()
    engine = factory.engine
    setup = engine.describe()
    done = next((old for old in run.sections if old.dtype == setup.dtype), None)
    section = Section(
        dtype=setup.dtype,
        dtype_reason=setup.dtype_reason,
        runner=setup.runner,
        loop=setup.loop + (f" ({setup.loop_note})" if setup.loop_note else ""),
        default_tree=setup.tree,
        tree_reason=setup.tree_reason,
        model_memory_bytes=current_rss_bytes() - before,
        # The tuning profile (if any) predicts each fixed tree's tokens per step and speed.
        profile=profile.to_json() if (profile := load_profile(engine.profile_key)) else None,
    )
    if done is not None:  # resuming: keep what was measured
        section.records, section.cost_curves, section.wall_seconds = done.records, done.cost_curves, done.wall_seconds
        run.sections.remove(done)
    run.sections.append(section)
    methods = build_methods(factory, config, section)
    warm_up(methods, engine, config.warm_up, section)
    if config.cost_curve and not section.cost_curves:
        progress.note(f"{setup.dtype}: measuring the runners' cost curves")
        section.cost_curves = forward_costs(factory.cost_runners(methods))
    measured = {record.question_id for record in section.records}  # whole questions only
    remaining = [q for q in config.questions if q.question_id not in measured]
    progress.add_work(sum(len(q.turns) for q in remaining) * len(methods) * config.repeats)
    turns_before = 0
    earlier_wall = section.wall_seconds
    for question in config.questions:
        if question.question_id not in measured:
            section.records += run_question(question, methods, engine, config, progress, turns_before)
            section.wall_seconds = earlier_wall + time.perf_counter() - start
            save_results(run, config.out)
        turns_before += len(question.turns)


def build_methods(factory: MethodFactory, config: BenchConfig, section: Section) -> list[Method]:
    """Each method asked for; one that cannot run here is an error when asked for by name and
    a note in the report when it was only part of the default set."""
    methods = []
    names = method_names(config.method_list(), list(config.trees) if config.trees else None)
    for temperature in config.temperatures:
        # Sampled runs are methods of their own, named with the temperature, against plain
        # sampling at that temperature on their runtime.
        sampling = Sampling.of(temperature)
        for name, base, tree in names:
            before = current_rss_bytes()
            try:
                method = factory.build(base, tree, name, sampling)
            except MethodUnavailable as exc:
                if config.methods is not None and base in config.methods:
                    raise MethodUnavailable(f"method {name}: {exc}") from None
                section.unavailable[name + temperature_suffix(temperature)] = str(exc)
                continue
            methods.append(method)
            section.methods[method.name] = MethodInfo(
                base, method.baseline, method.description, method.settings, temperature,
                memory_added_bytes=max(current_rss_bytes() - before, 0), drafter_bytes=method.drafter_bytes,
            )  # fmt: skip
    return methods


def warm_up(methods: list[Method], engine: Engine, prompts: int, section: Section) -> None:
    """Each method decodes a few short prompts first: one-off costs (allocation, kernel choice,
    a hot start's table) are paid outside the timing, on text that is not benchmarked."""
    for prompt in WARM_UP_PROMPTS[:prompts]:
        ids = engine.encode(prompt)
        for method in methods:
            try:
                method.run(ids, WARM_UP_TOKENS)
            except Exception as exc:  # recorded; the method's prompts will show it too
                section.methods[method.name].warm_up_error = one_line(exc)


def run_question(
    question: Question, methods: list[Method], engine: Engine, config: BenchConfig, progress: BenchProgress, turns_before: int
) -> list[Record]:
    records = []
    messages: list[dict] = []
    for turn, text in enumerate(question.turns):
        messages.append({"role": "user", "content": text})
        try:
            prompt_ids = engine.encode(messages)
            engine.check_fits(prompt_ids, config.max_new_tokens)
        except TokenRecycleError as exc:  # too long for the model: no method can run it
            return records + [failed_record(question, turn, m.name, exc) for m in methods]
        runs: dict[str, list[tuple[MethodRun | Exception, int]]] = {m.name: [] for m in methods}
        for repeat in range(config.repeats):
            for method in rotated(methods, turns_before + turn + repeat):
                progress.advance(f"{question.category} {question.question_id}/{turn + 1} {method.name}")
                runs[method.name].append(run_once(method, prompt_ids, config.max_new_tokens))
        turn_records = [record_of(question, turn, len(prompt_ids), name, outcome) for name, outcome in runs.items()]
        records += turn_records
        answer = next((r for r in turn_records if r.ok), None)  # the reference's, if it ran
        if answer is None:
            break
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True)})
    return records


def rotated(methods: list, shift: int) -> list:
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def run_once(method: Method, prompt_ids: np.ndarray, max_new_tokens: int) -> tuple[MethodRun | Exception, int]:
    """One timed run, and the peak resident memory during it. A failure is returned, not raised:
    one method's error must not end the benchmark (Ctrl-C still does)."""
    reset_peak_rss()
    try:
        outcome = method.run(prompt_ids, max_new_tokens)
    except Exception as exc:
        outcome = exc
    return outcome, peak_rss_bytes()


def record_of(question: Question, turn: int, prompt_tokens: int, method: str, outcomes: list) -> Record:
    failures = [run for run, _ in outcomes if isinstance(run, Exception)]
    if failures:
        return failed_record(question, turn, method, failures[0], prompt_tokens)
    runs = [run for run, _ in outcomes]
    first = runs[0]
    return Record(
        question.question_id, question.category, turn, prompt_tokens, method, "ok",
        seconds=[run.seconds for run in runs],
        new_tokens=len(first.token_ids),
        tokens_per_s=statistics.median(len(run.token_ids) / run.seconds for run in runs),
        accepted_lengths=first.accepted_lengths,
        token_ids=first.token_ids,
        peak_rss_bytes=max(peak for _, peak in outcomes),
        details=runs[-1].details or None,
    )  # fmt: skip


def failed_record(question: Question, turn: int, method: str, error: Exception, prompt_tokens: int = 0) -> Record:
    return Record(question.question_id, question.category, turn, prompt_tokens, method, "failed", one_line(error))


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"

