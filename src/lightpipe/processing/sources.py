"""Where image and audio inputs come from, read the same way for both: open binary files and http(s) URLs.

`fetch_url` is the one downloader: the URL quoted as browsers send it, one timeout for every network wait
and for the whole download, a size limit, and a body shorter than its Content-Length refused, never
decoded as if it were whole. Every failure is an `InvalidInput` that names the URL.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..checks import number
from ..errors import InvalidInput

DEFAULT_TIMEOUT_S = 60.0  # seconds a URL may take when no timeout is given, so a stalled server never hangs a call
DOWNLOAD_CHUNK = 1 << 16  # bytes asked of the socket per read
# Characters a URL may keep as they are: its delimiters, and "%" so that what is already escaped stays escaped.
URL_SAFE = ":/?#[]@!$&'()*+,;=%~"


def is_file_object(value: Any) -> bool:
    """An open file or file-like object (open(path, "rb"), io.BytesIO ...): something with a read() method."""
    return callable(getattr(value, "read", None))


def read_file_object(file: Any) -> bytes:
    """The rest of an open binary file, read from where it stands; InvalidInput when it cannot give bytes."""
    try:
        data = file.read()
    except Exception as e:  # closed, not readable, a network stream that failed ...
        raise InvalidInput(f"the file object given cannot be read ({type(e).__name__}: {e}).") from e
    if isinstance(data, str):
        raise InvalidInput("the file object given is open in text mode; open media files in binary mode ('rb').")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"the file object given read as {type(data).__name__}, not bytes.")
    if not data:
        raise InvalidInput("the file object given has nothing left to read (0 bytes); if it was just written, "
                           "rewind it first with .seek(0).")
    return bytes(data)


def is_url(text: str) -> bool:
    """Whether `text` is an http(s) URL; URI schemes are case-insensitive ("HTTPS://" too)."""
    return text[:8].lower().startswith(("http://", "https://"))


def check_timeout(timeout: Any) -> float:
    """A URL timeout in seconds (None: DEFAULT_TIMEOUT_S), or InvalidInput."""
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    return float(number("timeout", timeout, positive=True, unit="seconds"))


def quote_url(url: str) -> str:
    """Spaces and non-ASCII characters percent-encoded, as browsers and transformers' httpx send them
    (http.client refuses them raw); what is already escaped, and the URL's delimiters, stay as they are."""
    return urllib.parse.quote(url, safe=URL_SAFE)


def fetch_url(url: str, timeout: float | None = None, *, max_bytes: int) -> bytes:
    """The body at an http(s) URL, at most `max_bytes` long.

    `timeout` (seconds, DEFAULT_TIMEOUT_S when None) bounds each network wait and, checked between reads,
    the whole download, so a server that drips bytes cannot hold a call. A refused or reset connection, an
    HTTP error, a malformed response, a body past `max_bytes`, shorter than its Content-Length or empty:
    InvalidInput naming the URL.
    """
    timeout = check_timeout(timeout)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(quote_url(url), headers={"User-Agent": "lightpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = _read_body(response, url, timeout, deadline, max_bytes)
    except urllib.error.HTTPError as e:
        raise InvalidInput(f"fetching {url} failed: HTTP {e.code} {e.reason}.") from e
    except urllib.error.URLError as e:  # refused, unknown host, or a timeout while connecting
        raise InvalidInput(f"fetching {url} failed: {e.reason} (timeout {timeout:g} s); check the URL and "
                           "network, or pass a larger timeout=.") from e
    except (http.client.HTTPException, OSError, ValueError) as e:  # reset, socket timeout, malformed response
        if isinstance(e, InvalidInput):
            raise
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise InvalidInput(f"fetching {url} failed: {reason} (timeout {timeout:g} s); check the URL and network, "
                           "or pass a larger timeout=.") from e
    if not data:
        raise InvalidInput(f"fetching {url} gave an empty body (0 bytes).")
    return data


def _read_body(response, url: str, timeout: float, deadline: float, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidInput(f"fetching {url} refused: it is {int(declared)} bytes, more than the {max_bytes} "
                           "bytes allowed.")
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise InvalidInput(f"fetching {url} took longer than the timeout of {timeout:g} s.")
        # read1 returns what has arrived after one network read; read() would wait for a whole chunk
        chunk = response.read1(DOWNLOAD_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise InvalidInput(f"fetching {url} refused: it is larger than the {max_bytes} bytes allowed.")
        chunks.append(chunk)
    if response.length:  # read1 ends quietly when the server closes early: the missing bytes show here
        raise InvalidInput(f"fetching {url} failed: the connection closed after {size} bytes, "
                           f"{response.length} short of its Content-Length.")
    return b"".join(chunks)
