"""The server's settings and its HTTP errors: every refusal is an `HTTPError` with a status, a type and a message,
answered as JSON {"error", "type"} (OpenAI's {"error": {"message", "type", "code"}} on the /v1 routes)."""

from __future__ import annotations

import dataclasses
import hmac
import math
from typing import Any

from ..errors import InvalidInput, LightpipeError


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `lightpipe serve` and `lightpipe.serve.app` take. Checked once, at start."""

    batch_size: int = 8  # inputs per model batch, at most
    max_wait_ms: float = 5.0  # how long the first waiting request may wait for others to join its batch
    max_queue: int = 256  # requests waiting at most; one more is answered 429
    timeout_s: float = 60.0  # a request not answered by then is answered 504 (dropped if it has not started)
    max_body_mb: float = 25.0  # a larger request body is answered 413
    max_batch_tokens: int = 16384  # token budget of one batch (texts, estimated at 4 characters a token)
    max_batch_audio_s: float = 240.0  # audio budget of one batch, in seconds (eight 30 s Whisper windows)
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>" (not /health)
    allow_paths: bool = False  # media inputs may name files on the server
    allow_urls: bool = False  # media inputs may name http(s) URLs for the server to fetch
    model_name: str | None = None  # the name /info and /v1/models give; default: the model argument

    def __post_init__(self):
        def positive(name, value, *, integer=False, zero=False):
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
            bad = bad or (integer and not isinstance(value, int)) or value < 0 or (value == 0 and not zero)
            if bad:
                kind = "integer" if integer else "number"
                raise InvalidInput(f"{name} must be a {'non-negative' if zero else 'positive'} {kind}, not {value!r}.")

        positive("batch_size", self.batch_size, integer=True)
        positive("max_wait_ms", self.max_wait_ms, zero=True)
        positive("max_queue", self.max_queue, integer=True)
        positive("timeout_s", self.timeout_s)
        positive("max_body_mb", self.max_body_mb)
        positive("max_batch_tokens", self.max_batch_tokens, integer=True)
        positive("max_batch_audio_s", self.max_batch_audio_s)
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise InvalidInput("api_key must be a non-empty string or None.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def public(self) -> dict[str, Any]:
        """The limits /info shows (never the key)."""
        shown = dataclasses.asdict(self)
        shown.pop("api_key")
        shown.pop("model_name")
        shown["api_key_required"] = self.api_key is not None
        return shown


class HTTPError(Exception):
    """A refusal: `status`, a short `type` (the error class or a reason), a message, extra headers."""

    def __init__(self, status: int, message: str, type: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}


def from_exception(error: BaseException) -> HTTPError:
    """A failure of a request's own work -> its HTTP error: lightpipe's typed errors are the caller's (422),
    anything else is the server's (500)."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, LightpipeError):
        return HTTPError(422, str(error), type(error).__name__)
    return HTTPError(500, f"the model failed on this request ({type(error).__name__}: {error}).", "InternalError")


def check_api_key(settings: Settings, authorization: str | None) -> None:
    """401 unless the request carries "Authorization: Bearer <key>" when a key is set (compared in constant time)."""
    if settings.api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise HTTPError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'.",
                        "Unauthorized", {"WWW-Authenticate": "Bearer"})


def check_content_length(settings: Settings, content_length: str | None) -> None:
    """413 before reading a body whose declared length is over the limit."""
    if content_length and content_length.isdigit() and int(content_length) > settings.max_body_bytes:
        raise too_large(settings)


def too_large(settings: Settings) -> HTTPError:
    return HTTPError(413, f"the request body is larger than the {settings.max_body_mb:g} MB allowed "
                          "(--max-body-mb).", "PayloadTooLarge")
