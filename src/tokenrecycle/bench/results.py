"""What a benchmark run measured, as typed objects, and results.json, the file that keeps them.

A BenchRun holds the machine, the settings and one Section per dtype; a section holds the methods
that ran (MethodInfo), the runners' cost curves and one Record per method, question and turn.
The harness builds these, report.md and the plots are drawn from them alone, and `--render` and
`--resume` read them back. The file carries RESULTS_VERSION: a file of another version, or one
that does not hold these types field for field, is a CorruptResultsError.
"""

from __future__ import annotations

import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from ..errors import CorruptResultsError, InvalidOptionError
from ..files import atomic_write

RESULTS_FILE = "results.json"
# 2: every field is always written; paths are relative to the project or names (1: fields left
# out where empty, absolute paths).
RESULTS_VERSION = 2


class JsonObject:
    """to_json() and from_json() for a dataclass whose fields hold JSON values, other such
    dataclasses, lists, tuples and dicts of them; from_json checks every field's type."""

    def to_json(self) -> dict:
        return encode(self)

    @classmethod
    def from_json(cls, data) -> typing.Self:
        return decode(cls, data, cls.__name__)


@dataclass
class Record(JsonObject):
    """One method on one turn of one question. A failed run keeps its error and zero counts."""

    question_id: str
    category: str
    turn: int
    prompt_tokens: int
    method: str
    status: str  # "ok" or "failed"
    error: str | None = None  # one line: the exception's type and message
    seconds: list[float] = field(default_factory=list)  # one per repeat
    new_tokens: int = 0
    tokens_per_s: float = 0.0  # median over repeats
    accepted_lengths: list[int] = field(default_factory=list)  # tokens decided per forward pass, prefill first
    token_ids: list[int] = field(default_factory=list)
    peak_rss_bytes: int = 0
    details: dict | None = None  # method-specific counters, cumulative (the auto drafter's credit)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class MethodInfo(JsonObject):
    """A method as it ran in a section: what it is and what it cost to set up."""

    base: str  # the method it is a variant of: tr for tr@tr8~t0.7
    baseline: str | None  # the method it is measured against; None for the reference
    description: str
    settings: dict  # its own options (tree, drafter, draft, ...), as the report lists them
    temperature: float  # 0: greedy
    memory_added_bytes: int
    drafter_bytes: int
    warm_up_error: str | None = None


@dataclass
class Section(JsonObject):
    """One dtype's part of a run: the setup it got, its methods, cost curves and records."""

    dtype: str
    dtype_reason: str
    runner: str
    loop: str | None  # how the runner runs its layers (the C++ loop), where it says
    default_tree: str
    tree_reason: str | None
    model_memory_bytes: int
    profile: dict | None  # the setup's tuning profile as tuning writes it: it predicts each fixed tree
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # method -> why it could not run here
    cost_curves: dict[str, dict[int, float]] = field(default_factory=dict)  # runner -> tree tokens -> ms
    records: list[Record] = field(default_factory=list)
    wall_seconds: float = 0.0


@dataclass
class Machine(JsonObject):
    """hardware.machine_info(): what a result depends on besides the settings."""

    cpu: str
    cpu_flags: list[str]
    cores: int | None
    torch_threads: int
    python: str
    platform: str
    versions: dict[str, str]  # package -> version
    gpu: str | None = None  # the GPU the model ran on; None: the CPU (and in files from before GPUs)


@dataclass
class Settings(JsonObject):
    """What the run was asked to do (the BenchConfig, questions counted): a resumed run must be
    asked the same. Paths are as portable_path gives them."""

    out: str
    question_source: str
    model: str
    dtypes: tuple[str, ...]
    methods: tuple[str, ...] | None
    trees: tuple[str, ...] | None
    max_new_tokens: int
    temperatures: tuple[float, ...]
    repeats: int
    draft_model: str | None
    draft: str | None
    datastore: str | None
    pld_tokens: int
    pld_ngram: int
    llamacpp_pld_tokens: int
    warm_up: int
    cost_curve: bool
    questions: int
    turns: int
    categories: tuple[str, ...]
    device: str | None = None  # where the models ran (cpu, cuda:0); None in files from before devices


@dataclass
class BenchRun(JsonObject):
    """A whole run: what results.json holds."""

    status: str  # "running", "complete" or "interrupted"
    started: str
    machine: Machine
    settings: Settings
    sections: list[Section] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # when the run was continued, if it was

    @property
    def measured(self) -> bool:
        return any(section.records for section in self.sections)

    def to_json(self) -> dict:
        return {"version": RESULTS_VERSION, **encode(self)}

    @classmethod
    def from_json(cls, data) -> BenchRun:
        version = data.get("version") if isinstance(data, dict) else None
        if version != RESULTS_VERSION:
            found = f"format version {version}" if version is not None else "no format version"
            raise CorruptResultsError(f"{found}; this tokenrecycle reads bench results of version {RESULTS_VERSION}")
        return decode(cls, {key: value for key, value in data.items() if key != "version"}, "results")


def save_results(run: BenchRun, out: str | os.PathLike) -> Path:
    """Write results.json whole or not at all: a crash or Ctrl-C mid-write keeps the last good file."""
    path = Path(out) / RESULTS_FILE
    with atomic_write(path, "w") as file:
        json.dump(run.to_json(), file, indent=1)
    return path


def load_results(out: str | os.PathLike) -> BenchRun:
    path = Path(out) / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidOptionError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise CorruptResultsError(f"{path} is not JSON: {exc}") from None
    try:
        return BenchRun.from_json(data)
    except CorruptResultsError as exc:
        raise CorruptResultsError(f"{path}: {exc}") from None


def portable_path(path: str | os.PathLike) -> str:
    """A path as results may keep it: committed, they must not say where this machine keeps its
    files. A relative path stays as typed; an absolute one becomes relative to the project (the
    working directory) when inside it, else the file's name: the model, not its path."""
    path, project = Path(path), Path.cwd()
    if not path.is_absolute():
        return str(path)
    return str(path.relative_to(project)) if path.is_relative_to(project) else path.name


# ---- JSON <-> typed fields -----------------------------------------------------------------
def encode(value):
    """Typed results as JSON values: dataclasses become objects, tuples lists, keys strings."""
    if is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def decode(kind, value, where: str):
    """JSON `value` as the type `kind` (a field's annotation), or CorruptResultsError saying
    `where` it went wrong. A bare dict is free-form (method settings, a tuning profile)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if is_dataclass(kind):
        return decode_dataclass(kind, value, where)
    if origin is types.UnionType:  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return decode(inner, value, where)
    if origin in (list, tuple):
        expect(value, (list, tuple), where)
        return origin(decode(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        expect(value, (dict,), where)
        key_kind, item_kind = args
        return {decode_key(key_kind, key, where): decode(item_kind, item, f"{where}.{key}") for key, item in value.items()}
    if kind is float:
        expect(value, (int, float), where)
        return float(value)
    expect(value, (kind,), where)
    return value


def decode_dataclass(kind, value, where: str):
    expect(value, (dict,), where)
    hints = field_types(kind)
    names = list(hints)
    missing = [n for n in names if n not in value and n not in optional_fields(kind)]
    unknown = [k for k in value if k not in hints]
    if missing or unknown:
        raise CorruptResultsError(f"{where}: " + "; ".join(
            [f"missing field '{n}'" for n in missing] + [f"unknown field '{k}'" for k in unknown]
        ))  # fmt: skip
    return kind(**{n: decode(hints[n], value[n], f"{where}.{n}") for n in names if n in value})


@functools.cache
def optional_fields(kind) -> frozenset[str]:
    """Fields that may be absent: those added later with a default of None (files written before
    them read as None); every other field must be there."""
    return frozenset(f.name for f in fields(kind) if f.default is None)


@functools.cache
def field_types(kind) -> dict:
    """A dataclass's fields and their annotations as types, in order (read once per class)."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in fields(kind)}


def decode_key(kind, key: str, where: str):
    """JSON object keys are strings; the cost curves' tree sizes are ints."""
    if kind is int:
        try:
            return int(key)
        except ValueError:
            raise CorruptResultsError(f"{where}: key '{key}' is not a whole number") from None
    return key


def expect(value, kinds: tuple, where: str) -> None:
    # True is an int to isinstance, but a count of True is a damaged file
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise CorruptResultsError(f"{where}: expected {names}, found {type(value).__name__}")
