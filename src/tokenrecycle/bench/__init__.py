"""`tokenrecycle bench`: speed, acceptance and exactness of tokenrecycle and its peers, one process."""

from .harness import BenchConfig, run_bench
from .questions import Question, default_questions, per_category, read_questions
from .report import render

__all__ = ["BenchConfig", "Question", "default_questions", "per_category", "read_questions", "render", "run_bench"]
