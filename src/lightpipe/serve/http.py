"""What every route shares: the server's state, reading bodies under the size limit, answering JSON and errors,
counting requests for /metrics."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import LightpipeError
from .batching import Batcher, Job
from .limits import HTTPError, Settings, check_api_key, check_content_length, from_exception, too_large
from .metrics import Metrics

log = logging.getLogger(__name__)


class Server:
    """The pipeline (or its loader), the settings, the batcher and the metrics behind one app."""

    def __init__(self, pipe=None, *, loader: Callable[[], Any] | None = None, settings: Settings,
                 model_name: str | None = None, task: str | None = None):
        self.settings = settings
        self.pipe = pipe
        self.loader = loader
        self.load_error: BaseException | None = None
        self.task = pipe.task if pipe is not None else task
        self.model_name = settings.model_name or model_name or (self.task or "lightpipe")
        self.metrics = Metrics(queue_length=lambda: self.batcher.queue_length, running=lambda: self.batcher.running,
                               ready=lambda: 1 if self.pipe is not None else 0)
        self.batcher = Batcher(settings, self.metrics, pipe)
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.batcher.start()
        if self.pipe is None and self.loader is not None:
            threading.Thread(target=self._load, name="lightpipe-model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            pipe = self.loader()
        except BaseException as e:  # shown by /health and every model route
            log.exception("loading the pipeline failed")
            self.load_error = e
            return
        self.task = pipe.task
        self.batcher.pipe = pipe
        self.pipe = pipe
        log.info("lightpipe serve: %s ready", self.task)

    def stop(self) -> None:
        self.batcher.stop()

    def ready(self) -> Any:
        """The pipeline, or 503 while it loads (500 when loading failed)."""
        if self.pipe is not None:
            return self.pipe
        if self.load_error is not None:
            raise HTTPError(500, f"the model failed to load: {type(self.load_error).__name__}: {self.load_error}",
                            "ModelLoadFailed")
        raise HTTPError(503, "the model is loading; retry shortly.", "ModelLoading", {"Retry-After": "2"})

    async def run(self, job: Job) -> Any:
        return await self.batcher.run(job)


def _plain(value: Any):
    """JSON for what results may hold besides plain data: tensors and numpy values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot answer {type(value).__name__} as JSON")


def to_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=_plain, allow_nan=False)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(to_json(data).encode("utf-8"), status_code=status, headers=headers, media_type="application/json")


def error_response(error: HTTPError, openai: bool = False):
    if openai:
        code = {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 413: "payload_too_large",
                429: "rate_limit_exceeded", 503: "model_loading", 504: "timeout"}.get(error.status, error.type)
        kind = ("authentication_error" if error.status == 401 else "rate_limit_error" if error.status == 429
                else "server_error" if error.status >= 500 else "invalid_request_error")
        data = {"error": {"message": error.message, "type": kind, "code": code, "param": None}}
    else:
        data = {"error": error.message, "type": error.type}
    return json_response(data, error.status, error.headers)


def timing_headers(job: Job) -> dict[str, str]:
    return {"x-queue-time": f"{job.queue_s:.6f}", "x-inference-time": f"{job.inference_s:.6f}",
            "x-batch-size": str(job.batch_inputs)}


Handler = Callable[[Any], Awaitable[Any]]


def endpoint(server: Server, route: str, *, openai: bool = False, auth: bool = True):
    """Wrap a route: the API key, errors as JSON (OpenAI's shape on /v1), and the request counter."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request):
            try:
                if auth:
                    check_api_key(server.settings, request.headers.get("authorization"))
                response = await handler(request)
            except HTTPError as e:
                response = error_response(e, openai)
            except LightpipeError as e:
                response = error_response(from_exception(e), openai)
            except Exception as e:  # a bug of ours: answered, logged, the server goes on
                log.exception("%s failed", route)
                response = error_response(from_exception(e), openai)
            server.metrics.requests.inc(route=route, status=response.status_code)
            return response

        return run

    return wrap


async def read_body(request, settings: Settings) -> bytes:
    """The whole body, or 413 as soon as it passes the limit (declared or counted)."""
    check_content_length(settings, request.headers.get("content-length"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise too_large(settings)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request, settings: Settings) -> Any:
    body = await read_body(request, settings)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e}).", "BadRequest") from e


async def read_form(request, settings: Settings):
    """A multipart form read under the size limit (each part may be as large as the whole body)."""
    from starlette.requests import Request

    body = await read_body(request, settings)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_part_size=settings.max_body_bytes)
    except Exception as e:  # malformed multipart data
        raise HTTPError(400, f"the multipart form cannot be read ({e}).", "BadRequest") from e
