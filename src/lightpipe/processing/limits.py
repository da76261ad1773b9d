"""Size limits on one input, set per pipeline or per call: `max_image_pixels`, `max_audio_seconds`.

A pipeline applies the limits of a call around each `preprocess` (`applied(...)`, in whichever thread runs it);
the loaders (image_io, audio_io) read them here. Outside a pipeline call, or when a call does not set one, the
defaults are the module constants `image_io.MAX_IMAGE_PIXELS` and `audio_io.MAX_DURATION_S`, read at call time;
for images, a `PIL.Image.MAX_IMAGE_PIXELS` that the application changed (None: no limit) wins over ours.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

from ..checks import number, positive_int
from ..errors import InvalidInput

# Parameter name -> the kind of input it limits.
PARAMS = {"max_image_pixels": "image", "max_audio_seconds": "audio"}
PIL_DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default, 89_478_485

_UNSET = object()
_current: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("lightpipe_input_limits", default={})


def check(name: str, value: Any) -> Any:
    """A limit as given (None: no limit) or InvalidInput."""
    if value is None:
        return None
    if name == "max_image_pixels":
        return positive_int(name, value)
    if name == "max_audio_seconds":
        return number(name, value, positive=True, unit="seconds")
    raise InvalidInput(f"unknown input limit {name!r}; known: {', '.join(PARAMS)}.")


@contextlib.contextmanager
def applied(limits: dict[str, Any]) -> Iterator[None]:
    """The limits of one call (only the names given; the others keep their defaults) while the block runs."""
    if not limits:
        yield
        return
    token = _current.set({**_current.get(), **limits})
    try:
        yield
    finally:
        _current.reset(token)


def max_image_pixels() -> int | None:
    """The pixel limit in force: the call's or pipeline's max_image_pixels; else PIL.Image.MAX_IMAGE_PIXELS when the
    application changed it from Pillow's default (None there means no limit, an explicit choice); else
    image_io.MAX_IMAGE_PIXELS."""
    given = _current.get().get("max_image_pixels", _UNSET)
    if given is not _UNSET:
        return given
    from . import image_io

    try:
        import PIL.Image
        pil_limit = PIL.Image.MAX_IMAGE_PIXELS
    except ImportError:  # pragma: no cover - images need Pillow anyway
        pil_limit = PIL_DEFAULT_MAX_IMAGE_PIXELS
    if pil_limit != PIL_DEFAULT_MAX_IMAGE_PIXELS:
        return pil_limit
    return image_io.MAX_IMAGE_PIXELS


def max_audio_seconds() -> float | None:
    """The duration limit in force: the call's or pipeline's max_audio_seconds, else audio_io.MAX_DURATION_S."""
    given = _current.get().get("max_audio_seconds", _UNSET)
    if given is not _UNSET:
        return given
    from . import audio_io

    return audio_io.MAX_DURATION_S
