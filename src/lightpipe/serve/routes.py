"""The native routes: POST / and /predict (the Python call over HTTP), GET /health, /info, /metrics."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..errors import InvalidInput
from .http import Server, endpoint, json_response, read_body, read_form, read_json, timing_headers
from .inputs import DOCUMENT_TASKS, check_params, make_job, media_kind, prepare_inputs
from .limits import HTTPError
from .metrics import CONTENT_TYPE


async def _request_inputs(request, server: Server, pipe) -> tuple[Any, bool, dict[str, Any], bool]:
    """(inputs, single, parameters, stream) of a JSON body, a multipart form or a raw media body."""
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
        return (items[0], True, params, False) if len(items) == 1 else (items, False, params, False)
    if ctype in ("", "application/json") or ctype.endswith("+json"):
        body = await read_json(request, settings)
        if not isinstance(body, dict) or "inputs" not in body:
            raise HTTPError(422, 'the body must be a JSON object {"inputs": ..., "parameters": {...}}.', "InvalidInput")
        unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
        if unknown:
            raise HTTPError(422, f"unknown field(s) {unknown} in the body; it takes inputs, parameters and stream.",
                            "InvalidInput")
        params = check_params(body.get("parameters"))
        inputs, single = prepare_inputs(task, body["inputs"], settings)
        stream = body.get("stream", False)
        if stream not in (True, False):
            raise HTTPError(422, f"stream must be true or false, not {stream!r}.", "InvalidInput")
        if stream and (task != "text-generation" or not single):
            raise HTTPError(422, "stream=true streams one text-generation prompt or chat.", "InvalidInput")
        return inputs, single, params, stream
    if media_kind(task) is not None and task not in DOCUMENT_TASKS:  # a raw audio or image body
        data = await read_body(request, settings)
        if not data:
            raise InvalidInput("the body is empty: send the file's bytes.")
        return data, True, {}, False
    raise HTTPError(415, f"unsupported content type {ctype!r}: send JSON, or a multipart form or raw bytes for "
                         "audio and images.", "UnsupportedMediaType")


def _json_field(value: Any, name: str) -> Any:
    if value is None or not isinstance(value, str):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise HTTPError(422, f"the form field {name!r} must be JSON ({e}).", "InvalidInput") from e


async def _stream(server: Server, pipe, inputs: Any, params: dict[str, Any]):
    """Server-sent events: {"token": piece} as the text is generated, then {"result": the Python call's answer}
    (or {"error", "type"})."""
    from starlette.responses import StreamingResponse

    from .http import to_json
    from .limits import from_exception
    from .streaming import TokenStream

    stream = await TokenStream.start(server, pipe, inputs, params)

    async def events():
        try:
            async for piece in stream:
                yield f"data: {to_json({'token': piece})}\n\n"
            if stream.error is not None:
                error = from_exception(stream.error)
                yield f"data: {to_json({'error': error.message, 'type': error.type})}\n\n"
            else:
                yield f"data: {to_json({'result': stream.result})}\n\n"
        finally:
            stream.close()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def native_routes(server: Server) -> list:
    from starlette.responses import Response
    from starlette.routing import Route

    @endpoint(server, "/predict")
    async def predict(request):
        pipe = server.ready()
        inputs, single, params, stream = await _request_inputs(request, server, pipe)
        if stream:
            return await _stream(server, pipe, inputs, params)
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
