"""`tokenrecycle serve`: an OpenAI-compatible HTTP server on the engine.

    scheduler.py   one thread owns the engine: an inbox of commands, steps while there is work
    protocol.py    OpenAI's request bodies to prompts and RequestSettings; responses and chunks
    completions.py one completion: submitted, then answered whole or streamed; disconnects cancel
    errors.py      OpenAI's error shape and the status of each error
    metrics.py     Prometheus metrics in the app's own registry
    http.py        body size limit and JSON, the API key, SSE framing
    tokens.py      each token's text and bytes for logprobs
    drafting.py    which drafter a request gets
    settings.py    the server's settings
    app.py         the FastAPI app factory, create_app
    run.py         uvicorn, signals, the command's start
"""

from .settings import API_KEY_ENV, DEFAULT_MAX_TOKENS, ServerSettings


def __getattr__(name: str):
    """create_app, Drafting, ModelInfo and serve on first use: the CLI's parser imports this package
    for its defaults without loading FastAPI."""
    lazy = {"create_app": "app", "ModelInfo": "app", "Drafting": "drafting", "serve": "run"}
    if name in lazy:
        from importlib import import_module

        return getattr(import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["create_app", "ModelInfo", "Drafting", "ServerSettings", "serve", "API_KEY_ENV", "DEFAULT_MAX_TOKENS"]
