"""Request inputs -> pipeline inputs, checked before queueing.

Media (audio and images) arrive as base64 strings, data: URIs, multipart uploads or raw bodies and become bytes
here. A string in a media field that is neither is a server-side path or a URL: refused (403) unless the server
runs with allow_paths / allow_urls, so that by default a request can neither read the server's files nor make it
fetch from the network. Only the fields a task reads as media are checked (an ASR input, an image, a document
question's "image"); texts (a question-answering context, a prompt) stay texts.

Audio is decoded here, on a thread of the server (not the model worker), into the model's sampling rate: the
decoding runs beside the model, a file that cannot be decoded fails before queueing, and its length in seconds
is known for the batch's audio budget.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidInput
from .batching import Job, solo_params
from .limits import HTTPError, Settings

AUDIO_TASKS = ("automatic-speech-recognition",)
IMAGE_TASKS = ("image-classification", "image-feature-extraction", "zero-shot-image-classification")
DOCUMENT_TASKS = ("document-question-answering",)
CHARS_PER_TOKEN = 4  # the token budget's estimate of a text's length
SERVER_OWNED = ("batch_size", "num_workers", "progress", "streamer")  # the server's to set, not a request's


def media_kind(task: str) -> str | None:
    if task in AUDIO_TASKS:
        return "audio"
    if task in IMAGE_TASKS or task in DOCUMENT_TASKS:
        return "image"
    return None


def check_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise HTTPError(422, f'"parameters" must be a JSON object, not {type(params).__name__}.', "InvalidInput")
    owned = [k for k in params if k in SERVER_OWNED]
    if owned:
        raise HTTPError(422, f"{', '.join(owned)} is set by the server (lightpipe serve --batch-size ...), not by a "
                             "request.", "InvalidInput")
    return dict(params)


def is_batch(task: str, inputs: Any) -> bool:
    """Whether a request's inputs are a list of inputs (as the Python call reads a list) rather than one input."""
    if not isinstance(inputs, list):
        return False
    if task == "text-generation":  # a chat is a list of {"role", "content"} messages: one input
        return not (inputs and all(isinstance(m, Mapping) and "role" in m for m in inputs))
    return True


def decode_media_string(text: str, settings: Settings, what: str) -> str | bytes:
    """A media field's string -> its bytes (base64 or a data: URI), or the string itself when it is a URL or a
    path the settings allow; otherwise 403."""
    stripped = text.strip()
    lowered = stripped[:8].lower()
    if lowered.startswith("data:"):
        head, comma, payload = stripped.partition(",")
        if not comma:
            raise InvalidInput(f"{what}: a data: URI needs a comma before its data (data:audio/wav;base64,...).")
        return _base64(payload, what)
    if lowered.startswith(("http://", "https://")):
        if not settings.allow_urls:
            raise HTTPError(403, f"{what} is a URL: this server does not fetch URLs (start it with --allow-urls); "
                                 "send the file's bytes (base64, a data: URI or a multipart upload).", "URLNotAllowed")
        return stripped
    if lowered.startswith("file:"):
        if not settings.allow_paths:
            raise _path_refused(what)
        return stripped
    if looks_like_path(stripped):
        if not settings.allow_paths:
            raise _path_refused(what)
        return stripped
    if settings.allow_paths:
        import os

        if os.path.exists(stripped):
            return stripped
    try:
        return _base64(stripped, what)
    except InvalidInput:
        if settings.allow_paths:
            return stripped  # the pipeline says what is wrong with the path
        raise _path_refused(what) from None


def looks_like_path(text: str) -> bool:
    """A short string that starts the way paths do ("/", "~", "./", "../", "C:\\"); "/9j/" opens the base64 of
    every JPEG file, so it is not a path."""
    if len(text) >= 256 or text.startswith("/9j/"):
        return False
    return text.startswith(("/", "~", "./", "../", "\\")) or (len(text) > 2 and text[1] == ":" and text[2] in "/\\")


def _path_refused(what: str) -> HTTPError:
    return HTTPError(403, f"{what} is not base64 and looks like a file path: this server does not read its own "
                          "files (start it with --allow-paths); send the file's bytes (base64, a data: URI or a "
                          "multipart upload).", "PathNotAllowed")


def _base64(text: str, what: str) -> bytes:
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{what} is not valid base64 ({e}).") from e
    if not data:
        raise InvalidInput(f"{what} is empty.")
    return data


def prepare_media(value: Any, settings: Settings, what: str) -> Any:
    """One media value of a JSON request: strings are decoded or checked; anything else goes to the pipeline
    (which says what it cannot read)."""
    if isinstance(value, str):
        return decode_media_string(value, settings, what)
    return value


def prepare_inputs(task: str, inputs: Any, settings: Settings) -> tuple[Any, bool]:
    """A JSON request's "inputs" -> (pipeline inputs with media strings decoded, whether it is one input).
    Raises 403 for refused paths and URLs, InvalidInput (422) for bad base64."""
    single = not is_batch(task, inputs)
    items = [inputs] if single else inputs
    kind = media_kind(task)
    out = []
    for i, item in enumerate(items):
        what = "the input" if single else f"input {i}"
        if kind is None:
            out.append(item)
        elif task in DOCUMENT_TASKS:
            if isinstance(item, Mapping):
                item = dict(item)
                if item.get("image") is not None:
                    item["image"] = prepare_media(item["image"], settings, f"{what}'s image")
            out.append(item)
        elif kind == "audio":
            out.append(_audio_value(item, settings, what))
        else:
            if isinstance(item, Mapping) and "image" in item and task in IMAGE_TASKS:
                raise InvalidInput(f'{what}: send the image itself (a base64 string), not a dict.')
            out.append(prepare_media(item, settings, what))
    return (out[0] if single else out), single


def _audio_value(item: Any, settings: Settings, what: str) -> Any:
    if isinstance(item, Mapping):  # {"raw" or "array": [samples], "sampling_rate": Hz}
        item = dict(item)
        for key in ("raw", "array"):
            if isinstance(item.get(key), list):
                try:
                    item[key] = np.asarray(item[key], dtype=np.float32)
                except (TypeError, ValueError) as e:
                    raise InvalidInput(f"{what}: '{key}' must be a list of numbers ({e}).") from e
        return item
    if isinstance(item, list):
        raise InvalidInput(f'{what}: raw samples go in a dict {{"array": [...], "sampling_rate": 16000}}.')
    return prepare_media(item, settings, what)


def decode_audio(value: Any, sampling_rate: int) -> Any:
    """Audio bytes (or a path or URL the settings allowed) -> a float32 waveform at `sampling_rate`, on a server
    thread, so that neither decoding nor fetching holds the model worker; other values as given."""
    if isinstance(value, (bytes, bytearray, str)):
        from ..processing.audio_io import load_audio

        return load_audio(bytes(value) if not isinstance(value, str) else value, sampling_rate)
    return value


def audio_seconds(value: Any, sampling_rate: int) -> float:
    if isinstance(value, np.ndarray):
        return value.shape[-1] / sampling_rate
    if isinstance(value, Mapping):
        raw = value.get("raw", value.get("array"))
        rate = value.get("sampling_rate") or sampling_rate
        if isinstance(raw, np.ndarray) and isinstance(rate, (int, float)) and rate > 0:
            return raw.shape[-1] / rate
    return 30.0  # a path or URL: counted as one Whisper window


def text_cost(value: Any) -> float:
    """Estimated tokens of a text input (strings anywhere inside it)."""
    if isinstance(value, str):
        return math.ceil(len(value) / CHARS_PER_TOKEN) + 2
    if isinstance(value, Mapping):
        return sum(text_cost(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_cost(v) for v in value)
    return 1


async def make_job(server, pipe, inputs: Any, single: bool, params: dict[str, Any], **job_options) -> Job:
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
