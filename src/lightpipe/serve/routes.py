"""The native routes: POST / and /predict (the Python call over HTTP), GET /health, /info, /metrics."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..errors import InvalidInput
from .batching import Job, solo_params
from .http import Server, endpoint, json_response, read_form, read_json, read_body, timing_headers
from .inputs import (AUDIO_TASKS, DOCUMENT_TASKS, audio_seconds, check_params, decode_audio, media_kind,
                     prepare_inputs, text_cost)
from .limits import HTTPError
from .metrics import CONTENT_TYPE


async def make_job(server: Server, pipe, inputs: Any, single: bool, params: dict[str, Any], **job_options) -> Job:
    """Pipeline inputs -> a Job with its cost; audio bytes are decoded here, on a server thread."""
    from starlette.concurrency import run_in_threadpool

    task = pipe.task
    if task in AUDIO_TASKS:
        rate = pipe.feature_extractor.sampling_rate
        items = [inputs] if single else list(inputs)
        decoded = await run_in_threadpool(lambda: [decode_audio(x, rate) for x in items])
        cost = sum(audio_seconds(x, rate) for x in decoded)
        inputs = decoded[0] if single else decoded
        return Job(inputs, params, single=single, cost=cost, budget="audio", **job_options)
    solo = job_options.pop("solo", False) or solo_params(task, params)
    return Job(inputs, params, single=single, cost=0 if media_kind(task) == "image" else text_cost(inputs),
               solo=solo, **job_options)


async def _request_inputs(request, server: Server, pipe) -> tuple[Any, bool, dict[str, Any]]:
    """(inputs, single, parameters) of a JSON body, a multipart form or a raw media body."""
    settings, task = server.settings, pipe.task
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await read_form(request, settings)
        files = [await f.read() for f in form.getlist("file") + form.getlist("inputs") if hasattr(f, "read")]
        if not files or media_kind(task) is None:
            raise HTTPError(422, "a multipart request sends audio or an image as a 'file' field, to a speech or "
                                 "image task.", "InvalidInput")
        params = check_params(_json_field(form.get("parameters"), "parameters"))
        if task in DOCUMENT_TASKS:
            question = form.get("question")
            if not isinstance(question, str):
                raise InvalidInput("document-question-answering needs a 'question' field beside the file.")
            items = [{"image": f, "question": question} for f in files]
        else:
            items = files
        return (items[0], True, params) if len(items) == 1 else (items, False, params)
    if ctype in ("", "application/json") or ctype.endswith("+json"):
        body = await read_json(request, settings)
        if not isinstance(body, dict) or "inputs" not in body:
            raise HTTPError(422, 'the body must be a JSON object {"inputs": ..., "parameters": {...}}.', "InvalidInput")
        unknown = sorted(set(body) - {"inputs", "parameters"})
        if unknown:
            raise HTTPError(422, f"unknown field(s) {unknown} in the body; it takes inputs and parameters.",
                            "InvalidInput")
        params = check_params(body.get("parameters"))
        inputs, single = prepare_inputs(task, body["inputs"], settings)
        return inputs, single, params
    if media_kind(task) is not None and task not in DOCUMENT_TASKS:  # a raw audio or image body
        data = await read_body(request, settings)
        if not data:
            raise InvalidInput("the body is empty: send the file's bytes.")
        return data, True, {}
    raise HTTPError(415, f"unsupported content type {ctype!r}: send JSON, or a multipart form or raw bytes for "
                         "audio and images.", "UnsupportedMediaType")


def _json_field(value: Any, name: str) -> Any:
    if value is None or not isinstance(value, str):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise HTTPError(422, f"the form field {name!r} must be JSON ({e}).", "InvalidInput") from e


def native_routes(server: Server) -> list:
    from starlette.responses import Response
    from starlette.routing import Route

    @endpoint(server, "/predict")
    async def predict(request):
        pipe = server.ready()
        inputs, single, params = await _request_inputs(request, server, pipe)
        job = await make_job(server, pipe, inputs, single, params)
        result = await server.run(job)
        return json_response(result, headers=timing_headers(job))

    @endpoint(server, "/health", auth=False)
    async def health(request):
        if server.pipe is not None:
            return json_response({"status": "ok", "task": server.task})
        if server.load_error is not None:
            return json_response({"status": "failed", "error": f"{type(server.load_error).__name__}: "
                                                                f"{server.load_error}"}, 500)
        return json_response({"status": "loading"}, 503, {"Retry-After": "2"})

    @endpoint(server, "/info")
    async def info(request):
        pipe = server.pipe
        model = {"task": server.task, "model": server.model_name, "ready": pipe is not None,
                 "version": __version__, "limits": server.settings.public()}
        if pipe is not None:
            first = next(pipe.model.parameters(), None)
            model["dtype"] = str(first.dtype).replace("torch.", "") if first is not None else None
            model["device"] = str(pipe.device)
        model["routes"] = sorted({route.path for route in request.app.routes})
        return json_response(model)

    @endpoint(server, "/metrics")
    async def metrics(request):
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return [
        Route("/", predict, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
