"""What image and audio loading share: reading an open binary file given as one input."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput


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
