"""tokenrecycle: lossless speculative decoding with Token Recycling."""

from importlib.metadata import version

from .errors import (
    CorruptModelError,
    CorruptTableError,
    EmptyPromptError,
    InvalidOptionError,
    InvalidTemplateError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenRecycleError,
    UnsupportedModelError,
)
from .generator import Generation, GenerationResult, Generator
from .trees.templates import TEMPLATES

__version__ = version("tokenrecycle")

__all__ = [
    "Generator",
    "Generation",
    "GenerationResult",
    "TEMPLATES",
    "TokenRecycleError",
    "InvalidOptionError",
    "EmptyPromptError",
    "PromptTooLongError",
    "InvalidTemplateError",
    "ModelNotFoundError",
    "CorruptModelError",
    "UnsupportedModelError",
    "CorruptTableError",
]
