"""Serve any pipeline over HTTP: dynamic batching, limits, Prometheus metrics and OpenAI-compatible routes.

    from lightpipe import pipeline
    from lightpipe.serve import app
    asgi = app(pipeline("text-classification", model="./my-model"), batch_size=16, api_key="secret")
    # run it with any ASGI server: uvicorn.run(asgi, host="127.0.0.1", port=8000)

or from the command line: `lightpipe serve text-classification --model ./my-model --port 8000`.

Starlette and uvicorn (the `serve` extra) are imported when a server is made, never by `import lightpipe`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .limits import Settings

__all__ = ["app", "serve", "Settings"]

log = logging.getLogger(__name__)


def _starlette():
    try:
        import starlette  # noqa: F401
    except ImportError as e:
        from ..errors import MissingDependency

        raise MissingDependency("the server needs Starlette and uvicorn: pip install 'lightpipe[serve]'.") from e


def app(pipe=None, *, loader: Callable[[], Any] | None = None, task: str | None = None,
        model_name: str | None = None, **settings):
    """The ASGI app serving `pipe` (a lightpipe pipeline), or the pipeline `loader()` returns, loaded in the
    background once the app starts (the routes answer 503 until it is ready; give `task` so that /info can name
    it meanwhile). `settings`: the fields of `lightpipe.serve.Settings` (batch_size, max_wait_ms, max_queue,
    timeout_s, max_body_mb, max_batch_tokens, max_batch_audio_s, api_key, allow_paths, allow_urls)."""
    _starlette()
    import asyncio
    import contextlib

    from starlette.applications import Starlette

    from .http import Server, error_response
    from .limits import HTTPError
    from .openai import openai_routes
    from .routes import native_routes

    if (pipe is None) == (loader is None):
        raise TypeError("give a pipeline, or a loader that returns one (not both).")
    server = Server(pipe, loader=loader, settings=Settings(**settings), model_name=model_name or _name_of(pipe),
                    task=task)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:  # after the server stopped taking requests and those in flight were answered
            await asyncio.to_thread(server.stop)  # the worker finishes what is queued; the loop stays free

    async def not_found(request, exc):
        openai = request.url.path.startswith("/v1/")
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else "method not allowed" if status == 405 else str(exc)
        return error_response(HTTPError(status, f"{message}: {request.method} {request.url.path}.",
                                        "NotFound" if status == 404 else "MethodNotAllowed"), openai)

    asgi = Starlette(routes=native_routes(server) + openai_routes(server), lifespan=lifespan,
                     exception_handlers={404: not_found, 405: not_found})
    asgi.state.server = server
    if pipe is not None:  # usable at once, also by servers that skip the lifespan
        server.batcher.start()
    return asgi


def _name_of(pipe) -> str | None:
    if pipe is None:
        return None
    folder = getattr(pipe, "folder", None)
    return str(folder.name) if folder is not None and hasattr(folder, "name") else None


def serve(task: str | None = None, model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          device=None, dtype=None, log_level: str = "info", access_log: bool = False, **settings) -> None:
    """Listen at once, load `pipeline(task, model=model, ...)` in the background, and serve until SIGTERM or
    Ctrl-C (requests in flight are finished first). `access_log`: a log line per request (off: at thousands of
    requests a second the lines cost more than the answers)."""
    _starlette()
    import uvicorn

    from .. import pipeline

    def load():
        return pipeline(task, model=model, device=device, dtype=dtype)

    asgi = app(loader=load, task=task, model_name=settings.pop("model_name", None) or model or task, **settings)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=None)
