"""OpenAI-compatible routes, so that OpenAI's clients and SDKs work unchanged against a local model:

- POST /v1/audio/transcriptions (automatic-speech-recognition): multipart `file`, `model`, `language`, `prompt`,
  `temperature`, `response_format` (json, text, srt, vtt, verbose_json), `timestamp_granularities[]`;
- POST /v1/embeddings (feature-extraction): mean pooling over the tokens, L2-normalised; `encoding_format` float
  or base64 (little-endian float32), `dimensions`;
- POST /v1/chat/completions and /v1/completions (text-generation): `max_tokens`, `temperature` (0: greedy),
  `top_p`, `stop`, `n`, `seed`, `logit_bias`, `stream` (server-sent events ending with `data: [DONE]`);
- GET /v1/models.

Errors answer OpenAI's shape {"error": {"message", "type", "code", "param"}}. Requests go through the same
batcher as the native routes; a streaming generation runs alone on the model worker, its tokens sent as they come.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .http import Server, endpoint, json_response, read_form, read_json, timing_headers
from .inputs import make_job
from .limits import HTTPError
from .streaming import TokenStream

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _require(pipe, task: str, route: str) -> None:
    if pipe.task != task:
        raise HTTPError(404, f"{route} needs a {task} model; this server runs {pipe.task}.", "NotFound")


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message, "BadRequest")


def _number(body: Mapping, name: str, *, low: float | None = None, high: float | None = None,
            integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" between {low:g} and {high:g}" if low is not None and high is not None else (
            f" of at least {low:g}" if low is not None else "")
        raise _bad(f"{name} must be {'an integer' if integer else 'a number'}{bounds}, not {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------- transcriptions
async def transcriptions(server: Server, request):
    pipe = server.ready()
    _require(pipe, "automatic-speech-recognition", "/v1/audio/transcriptions")
    form = await read_form(request, server.settings)
    upload = form.get("file")
    if upload is None or not hasattr(upload, "read"):
        raise _bad("the 'file' field (the audio file) is missing.")
    data = await upload.read()
    if not data:
        raise _bad("the uploaded file is empty.")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise _bad(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}.")
    granularities = set(form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities"))
    if granularities - {"word", "segment"}:
        raise _bad("timestamp_granularities may hold 'word' and 'segment'.")
    generate: dict[str, Any] = {}
    language = form.get("language")
    # OpenAI clients often send language="en"; an English-only model takes no language, and English is what it
    # hears anyway, so the hint is dropped there rather than refused.
    english_only = not getattr(pipe, "multilingual", True)
    if language and not (english_only and language.strip().lower() in ("en", "english")):
        generate["language"] = language
    prompt = form.get("prompt")
    if prompt and prompt.strip():
        generate["prompt_ids"] = pipe.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False).ids
    temperature = form.get("temperature")
    if temperature:
        try:
            t = float(temperature)
        except ValueError:
            raise _bad(f"temperature must be a number, not {temperature!r}.") from None
        if t > 0:
            generate.update(temperature=t, do_sample=True)
    params: dict[str, Any] = {"generate_kwargs": generate} if generate else {}
    words = fmt == "verbose_json" and "word" in granularities
    segments = fmt in ("srt", "vtt") or (fmt == "verbose_json" and ("segment" in granularities or not words))
    job = await make_job(server, pipe, data, True, {**params, **({"return_timestamps": True} if segments else {})})
    result = await server.run(job)
    headers = timing_headers(job)
    if fmt == "json":
        return json_response({"text": result["text"]}, headers=headers)
    if fmt == "text":
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(result["text"], headers=headers)
    if fmt in ("srt", "vtt"):
        from starlette.responses import PlainTextResponse

        try:
            from .. import subtitles
        except ImportError:
            raise HTTPError(501, f"response_format={fmt} needs lightpipe.subtitles, not in this build.",
                            "NotImplemented") from None
        text = subtitles.to_srt(result) if fmt == "srt" else subtitles.to_vtt(result)
        return PlainTextResponse(text, headers=headers, media_type="text/vtt" if fmt == "vtt" else "text/plain")
    duration = job.cost
    body: dict[str, Any] = {"task": "transcribe", "language": language or "english", "duration": duration,
                            "text": result["text"]}
    if segments:
        body["segments"] = [_segment(pipe, i, chunk, duration) for i, chunk in enumerate(result.get("chunks", []))]
    if words:
        word_job = await make_job(server, pipe, job.inputs, True, {**params, "return_timestamps": "word"})
        word_result = await server.run(word_job)
        body["words"] = [{"word": c["text"].strip(), "start": c["timestamp"][0],
                          "end": c["timestamp"][1] if c["timestamp"][1] is not None else duration}
                         for c in word_result.get("chunks", [])]
    return json_response(body, headers=headers)


def _segment(pipe, index: int, chunk: Mapping, duration: float) -> dict[str, Any]:
    start, end = chunk["timestamp"]
    return {"id": index, "seek": 0, "start": start if start is not None else 0.0,
            "end": end if end is not None else duration, "text": chunk["text"],
            "tokens": pipe.tokenizer.encode(chunk["text"], add_special_tokens=False).ids,
            "compression_ratio": compression_ratio(chunk["text"]),
            # not returned by the pipeline: given as OpenAI's neutral values
            "temperature": 0.0, "avg_logprob": 0.0, "no_speech_prob": 0.0}


def compression_ratio(text: str) -> float:
    """openai-whisper's measure of a looping text: its UTF-8 bytes over their zlib-compressed size (0 when empty)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# ---------------------------------------------------------------------------------------------- embeddings
async def embeddings(server: Server, request):
    from starlette.concurrency import run_in_threadpool

    pipe = server.ready()
    _require(pipe, "feature-extraction", "/v1/embeddings")
    body = await read_json(request, server.settings)
    if not isinstance(body, dict) or "input" not in body:
        raise _bad("the body must be a JSON object with 'input' (a text or a list of texts).")
    given = body["input"]
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("input must be a text or a non-empty list of texts (token id arrays are not accepted).")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be 'float' or 'base64', not {fmt!r}.")
    dimensions = _number(body, "dimensions", low=1, integer=True)
    job = await make_job(server, pipe, texts, False, {"return_tensors": True})
    hidden = await server.run(job)
    vectors, tokens = await run_in_threadpool(_pool, hidden, dimensions)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64"
             else v.tolist()}
            for i, v in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": server.model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=timing_headers(job))


def _pool(hidden: list, dimensions: int | None) -> tuple[list[np.ndarray], int]:
    """(1, tokens, hidden) per text -> the mean over its tokens (the pipeline gives each text's own tokens, so this
    is the mean over the attention mask), L2-normalised; `dimensions` keeps the first ones, normalised again."""
    vectors, tokens = [], 0
    for h in hidden:
        states = h[0].float().numpy()
        tokens += states.shape[0]
        v = states.mean(axis=0)
        if dimensions is not None:
            v = v[:dimensions]
        vectors.append((v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32))
    return vectors, tokens


# ---------------------------------------------------------------------------------------------- generation
def generation_params(body: Mapping) -> tuple[dict[str, Any], list[str]]:
    """OpenAI's sampling fields -> the pipeline's parameters, and the stop strings."""
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_new_tokens"] = _number({"max_tokens": max_tokens}, "max_tokens", low=1, integer=True)
    temperature = _number(body, "temperature", low=0, high=2)
    if temperature is not None:
        params.update({"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature})
    top_p = _number(body, "top_p", low=0, high=1)
    if top_p is not None and top_p < 1:
        params["top_p"] = top_p
    n = _number(body, "n", low=1, high=128, integer=True)
    if n is not None and n > 1:
        params["num_return_sequences"] = n
    seed = _number(body, "seed", integer=True)
    if seed is not None:
        params["seed"] = seed
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, low=-2, high=2):
            raise _bad(f"{name} is not supported (only 0).")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported.")
    bias = _logit_bias(body.get("logit_bias"))
    if bias:
        params["sequence_bias"] = bias
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise _bad("stop must be a string or a list of up to 4 strings.")
    stops = [s for s in stops if s]
    if stops:
        params["stop_strings"] = stops
    return params, stops


def _logit_bias(raw: Any) -> list[list] | None:
    """OpenAI's logit_bias, {"token id": bias in [-100, 100]}, as the pipeline's sequence_bias in transformers' list
    form [[[token id], bias], ...] (plain JSON, so requests with equal parameters still batch together): one-token
    sequences, whose bias is added to that token's logit at every step, as OpenAI does."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _bad("logit_bias must be an object mapping token ids to biases in [-100, 100].")
    bias = []
    for token, value in raw.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            token_id = -1
        if token_id < 0 or isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise _bad(f"logit_bias maps token ids to numbers in [-100, 100]; got {token!r}: {value!r}.")
        bias.append([[token_id], float(value)])
    return bias


def _messages(body: Mapping) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects.")
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _bad("each message must be an object with a 'role' and a 'content'.")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
                raise _bad("only text content parts are supported.")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is not None and not isinstance(content, str):
            raise _bad("a message's content must be a string or a list of text parts.")
        out.append({"role": m["role"], "content": content or ""})
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """OpenAI leaves the stop sequence out of the text: the text before the first stop string, and whether one
    was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def _prompt_tokens(pipe, prompt: Any) -> int:
    """How many tokens the pipeline's preprocessing makes of a prompt or chat."""
    return sum(int(item.features["input_ids"].numel()) for item in pipe.preprocess(prompt))


def _completion(pipe, record: Mapping, prompt_tokens: int, stops: list[str]) -> tuple[str, str, int]:
    """A `return_tensors` record -> (text, finish_reason, completion tokens)."""
    generated = list(record["generated_token_ids"])[prompt_tokens:]
    text = pipe.tokenizer.decode(generated, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, stops)
    ended = bool(generated) and generated[-1] in set(pipe.generation_config.eos_token_ids)
    return text, "stop" if (ended or stopped) else "length", len(generated)


async def chat_completions(server: Server, request, *, chat: bool = True):
    from starlette.concurrency import run_in_threadpool

    pipe = server.ready()
    route = "/v1/chat/completions" if chat else "/v1/completions"
    _require(pipe, "text-generation", route)
    body = await read_json(request, server.settings)
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object.")
    params, stops = generation_params(body)
    if chat:
        prompts, single = [_messages(body)], True
    else:
        prompt = body.get("prompt")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _bad("prompt must be a text or a non-empty list of texts.")
    created, ident = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.get("stream"):
        if len(prompts) > 1 or params.get("num_return_sequences", 1) > 1:
            raise _bad("stream=true takes one prompt and n=1.")
        options = body.get("stream_options") or {}
        return await _stream(server, pipe, prompts[0], params, stops, chat=chat, ident=ident, created=created,
                             include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")),
                             echo=bool(body.get("echo")) and not chat)
    job = await make_job(server, pipe, prompts[0] if chat else prompts, chat, {**params, "return_tensors": True})
    results = await server.run(job)
    per_prompt = [results] if chat else results
    counts = await run_in_threadpool(lambda: [_prompt_tokens(pipe, p) for p in prompts])
    choices, used = [], 0
    for p, (prompt, records, prompt_tokens) in enumerate(zip(prompts, per_prompt, counts)):
        for j, record in enumerate(records):
            text, finish, n_tokens = _completion(pipe, record, prompt_tokens, stops)
            used += n_tokens
            index = p * len(records) + j
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish, "logprobs": None})
            else:
                shown = (prompt + text) if body.get("echo") else text
                choices.append({"index": index, "text": shown, "finish_reason": finish, "logprobs": None})
    prompt_total = sum(counts)
    answer = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
              "model": server.model_name, "choices": choices,
              "usage": {"prompt_tokens": prompt_total, "completion_tokens": used, "total_tokens": prompt_total + used}}
    return json_response(answer, headers=timing_headers(job))


class _StopFilter:
    """Streamed text with the stop strings (and whatever follows them) left out, as OpenAI streams it: the end of
    the text that could begin a stop string is held back until the next piece tells."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self.held + text
        cut, found = cut_at_stop(text, self.stops)
        if found:
            self.stopped, self.held = True, ""
            return cut
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


async def _stream(server: Server, pipe, prompt, params: dict, stops: list[str], *, chat: bool, ident: str,
                  created: int, include_usage: bool, echo: bool):
    from starlette.responses import StreamingResponse

    stream = await TokenStream.start(server, pipe, prompt, params)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None = None, finish: str | None = None, *, role: bool = False, usage=None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        data = {"id": ident, "object": kind, "created": created, "model": server.model_name,
                "choices": [] if usage is not None else choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events():
        stop_filter = _StopFilter(stops)
        try:
            if chat:
                yield chunk(role=True)
            elif echo:
                yield chunk(prompt)
            async for piece in stream:
                text = stop_filter.feed(piece)
                if text:
                    yield chunk(text)
            error = stream.error
            if error is not None:
                message = error.message if isinstance(error, HTTPError) else str(error)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
            else:
                tail = stop_filter.flush()
                if tail:
                    yield chunk(tail)
                yield chunk(finish="stop" if stream.ended_by_model(pipe) or stop_filter.stopped else "length")
                if include_usage:
                    p, c = stream.streamer.prompt_tokens or 0, len(stream.streamer.tokens)
                    yield chunk(usage={"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: stop generating
            stream.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------------------------------------- routes
def openai_routes(server: Server) -> list:
    from starlette.routing import Route

    def route(path: str, handler, methods=("POST",), **kwargs):
        @endpoint(server, path, openai=True)
        async def run(request):
            return await handler(server, request, **kwargs)

        return Route(path, run, methods=list(methods))

    async def models(server: Server, request):
        return json_response({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": int(server.started), "owned_by": "lightpipe"}]})

    return [
        route("/v1/audio/transcriptions", transcriptions),
        route("/v1/embeddings", embeddings),
        route("/v1/chat/completions", chat_completions, chat=True),
        route("/v1/completions", chat_completions, chat=False),
        route("/v1/models", models, methods=("GET",)),
    ]

