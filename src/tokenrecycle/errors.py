"""Typed exceptions: every bad input ends in one of these, never in a traceback from deep inside."""


class TokenRecycleError(Exception):
    """Base class: the message is one line, fit to show a user as it is."""


class InvalidOptionError(TokenRecycleError, ValueError):
    """An option is out of range or malformed (max_new_tokens < 1, unknown dtype, ...)."""


class EmptyPromptError(InvalidOptionError):
    """The prompt is empty or only white space."""


class PromptTooLongError(InvalidOptionError):
    """The prompt, with the tokens asked for, does not fit in the model's context window."""


class InvalidTemplateError(InvalidOptionError):
    """A tree template is not a prefix-closed set of rank paths with ranks below k."""


class ModelNotFoundError(TokenRecycleError, FileNotFoundError):
    """The model name or path does not resolve to anything loadable."""


class CorruptModelError(TokenRecycleError):
    """A model file exists but cannot be read (truncated or damaged GGUF, broken directory)."""


class UnsupportedModelError(TokenRecycleError):
    """The architecture is not one the runner can verify trees for; refused rather than risk a wrong answer."""


class CorruptTableError(TokenRecycleError):
    """A saved Token Recycling table cannot be read or does not fit this model."""


class CorruptResultsError(TokenRecycleError):
    """A bench results file cannot be read: damaged, not bench results, or of another format version."""


class NoFreeSlotError(TokenRecycleError):
    """Every KV-cache slot of the runner is held by a running request."""


class EngineBusyError(TokenRecycleError):
    """The engine's slots are busy and its queue of waiting requests is full: try again later."""
