"""tokenrecycle: lossless speculative decoding with Token Recycling."""

from importlib.metadata import version

from .errors import (
    CorruptModelError,
    CorruptResultsError,
    CorruptTableError,
    EmptyPromptError,
    EngineBusyError,
    InvalidOptionError,
    InvalidTemplateError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenRecycleError,
    UnsupportedModelError,
)
from .engine import Engine, Setup
from .generator import Generator, TextStream
from .request import GenerationResult, Request, RequestSettings, RequestState
from .trees.templates import TEMPLATES

__version__ = version("tokenrecycle")

__all__ = [
    "Engine",
    "Setup",
    "Request",
    "RequestSettings",
    "RequestState",
    "Generator",
    "TextStream",
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
    "CorruptResultsError",
    "EngineBusyError",
]
