"""Image inputs -> upright RGB PIL images: from a path, URL, base64 string, bytes, file object, PIL image or array.

`load_image` refuses what cannot be decoded with an `InvalidInput` that says why: unreadable or truncated
files, non-image bytes, images past the pixel limit (decompression bombs). The EXIF orientation is applied.
URLs are fetched by `sources.fetch_url`, as audio is. What a model makes of the image (resize, crop,
normalise) is processing/image.py's.

Pillow is an optional dependency (`pip install 'lightpipe[vision]'`), imported on first use.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput, MissingDependency
from . import limits
from .sources import fetch_url, is_file_object, is_url, read_file_object

# Decoded images larger than this many pixels are refused from their header, before decoding:
# a 100 kB PNG can claim 20000 x 20000 pixels and take gigabytes to decode. Pillow's own default.
# The default of a pipeline's max_image_pixels (processing/limits.py), read at call time; a
# PIL.Image.MAX_IMAGE_PIXELS the application changed (None: no limit) wins over it.
MAX_IMAGE_PIXELS = 89_478_485  # ~ 9459 x 9459
MAX_DOWNLOAD_BYTES = 100 * 2**20  # 100 MiB: the largest image fetched from a URL; no real image needs more
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def require_pil():
    """The PIL modules, or MissingDependency saying how to install them."""
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as e:
        raise MissingDependency(
            "image inputs need Pillow: pip install 'lightpipe[vision]' (or pip install pillow)."
        ) from e
    return PIL


def load_image(image: Any, timeout: float | None = None):
    """An image in any accepted form -> an upright RGB `PIL.Image.Image`.

    Accepts a local path (str, os.PathLike or a file:// URI), an http(s) URL (fetched within `timeout`
    seconds, sources.DEFAULT_TIMEOUT_S when None), a base64 string or a `data:image/...;base64,` URI, raw
    bytes, an open binary file (io.BytesIO, open(path, "rb")), a PIL image, or an array (numpy or
    torch): (H, W) grayscale, (H, W, C) or (C, H, W) with C in 1, 3, 4; uint8, or floats holding
    0..255 integers or 0..1 intensities. Whitespace around a string is ignored when no file has the
    name as given. The EXIF orientation is applied, as transformers' load_image does. Anything
    unreadable raises InvalidInput saying why.
    """
    PIL = require_pil()
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
        if width == 0 or height == 0:  # Pillow makes these; resizing them divides by zero
            raise InvalidInput(f"the PIL image has no pixels ({width} x {height}).")
        return _upright_rgb(image, owned=False)
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        return _load_string(image, timeout)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), "the bytes given")
    if is_file_object(image):
        return _decode(read_file_object(image), "the file object given")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise InvalidInput(
        f"an image must be a path, an http(s) URL, a base64 string, bytes, a binary file object, a PIL image "
        f"or an array, not {type(image).__name__}."
    )


def _load_string(text: str, timeout: float | None):
    if text.strip() != text and not os.path.exists(text):
        # A path or URL read from a line of a file often keeps its newline, and transformers then fails
        # ("Incorrect image source"). A file whose name really has the whitespace is still found above.
        text = text.strip()
    if is_url(text):
        return _decode(fetch_url(text, timeout, max_bytes=MAX_DOWNLOAD_BYTES), text)
    if text[:5].lower() == "data:":  # URI schemes are case-insensitive
        return _decode(_data_uri(text), "the data: URI")
    if text.startswith("file://"):
        import urllib.parse
        import urllib.request

        # file:///abs/path (and file://localhost/...): transformers fails on these; they name a local file.
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(f"{text!r} names a file on another host ({parts.netloc}); give a local path.")
        text = urllib.request.url2pathname(parts.path)
        if not os.path.isfile(text):
            raise InvalidInput(f"the file URI names {text}, which is not an existing file.")
    if os.path.isfile(text):
        try:
            with open(text, "rb") as f:
                return _decode(f, text)
        except OSError as e:
            raise InvalidInput(f"the image file {text} cannot be read: {e}") from e
    if os.path.isdir(text):
        raise InvalidInput(f"{text} is a folder, not an image file.")
    try:
        return _decode(_base64(text, "it"), "it")
    except InvalidInput as e:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidInput(
            f"{shown!r} is neither an existing file, an http(s) URL, nor a base64-encoded image ({str(e).rstrip('.')})."
        ) from None


def _data_uri(text: str) -> bytes:
    """The bytes of a data: URI (RFC 2397): data:[<media type>][;base64],<data>."""
    head, comma, payload = text.partition(",")
    if not comma:
        raise InvalidInput("a data: URI needs a comma before its data (data:image/png;base64,...).")
    if ";base64" in head.lower():
        return _base64(payload, "the data: URI")
    # Without ";base64" the data is percent-encoded bytes. transformers decodes the part after the comma as
    # base64 anyway, and data:image/png,<base64> is a common slip, so base64 that decodes is taken first;
    # anything else is read as percent-encoded bytes, as RFC 2397 says.
    try:
        return _base64(payload, "the data: URI")
    except InvalidInput:
        import urllib.parse

        return urllib.parse.unquote_to_bytes(payload)


def _base64(text: str, what: str) -> bytes:
    compact = "".join(text.split())  # base64 text is often wrapped over several lines
    # Padding as it should be, whatever was given: transformers' decoder ignores excess "=", and a
    # missing one is a common slip of encoders that strip it (JWT-style); the data is the same.
    core = compact.rstrip("=")
    compact = core + "=" * (-len(core) % 4)
    if "-" in compact or "_" in compact:  # the URL-safe alphabet (base64.urlsafe_b64encode): "-_" for "+/"
        compact = compact.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{what} is not valid base64: {e}") from e


# Pillow warns (DecompressionBombWarning) at open for images above its own limit; we refuse those
# ourselves, with a message, so the warning is silenced around open. catch_warnings swaps global
# state, hence the lock for the preprocessing threads.
_OPEN_LOCK = threading.Lock()


def _open(source, what: str):
    PIL = require_pil()
    if isinstance(source, bytes):
        if not source:
            raise InvalidInput(f"{what} is empty (0 bytes), not an image.")
        source = io.BytesIO(source)
    limit = limits.max_image_pixels()
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            pil_limit = PIL.Image.MAX_IMAGE_PIXELS
            if pil_limit is None or (limit is not None and limit <= pil_limit):
                return PIL.Image.open(source)
            # A limit above Pillow's: Pillow would refuse at open what the caller allowed; _checked_size
            # applies the caller's limit instead. Swapped under the lock, restored at once.
            PIL.Image.MAX_IMAGE_PIXELS = None
            try:
                return PIL.Image.open(source)
            finally:
                PIL.Image.MAX_IMAGE_PIXELS = pil_limit
    except PIL.Image.DecompressionBombError as e:
        raise InvalidInput(f"{what} is too large to decode safely ({e}).") from e
    except PIL.UnidentifiedImageError as e:
        empty = " (it is empty)" if _is_empty(source) else ""
        raise InvalidInput(f"{what} is not an image Pillow can read{empty}.") from e
    except Exception as e:  # Pillow's parsers raise many kinds (OSError, SyntaxError, struct.error ...)
        raise InvalidInput(f"{what} is not a readable image ({type(e).__name__}: {e}).") from e


def _is_empty(source) -> bool:
    try:
        source.seek(0, io.SEEK_END)
        return source.tell() == 0
    except (AttributeError, OSError, ValueError):
        return False


def _checked_size(image, what: str):
    """The image, if its header's size is one we decode."""
    width, height = image.size
    limit = limits.max_image_pixels()
    if limit is not None and width * height > limit:
        raise InvalidInput(
            f"{what} is {width} x {height} pixels, more than the {limit} lightpipe decodes (max_image_pixels, "
            "a guard against decompression bombs); resize it first, or raise the limit: "
            "pipeline(..., max_image_pixels=...)."
        )
    if width == 0 or height == 0:
        raise InvalidInput(f"{what} has no pixels ({width} x {height}).")
    return image


def _decode(source, what: str):
    """Open, size-check from the header, then decode fully, so truncated files fail here and not later."""
    image = _checked_size(_open(source, what), what)
    try:
        image.load()
    except Exception as e:  # truncated data, corrupt streams: Pillow raises OSError, SyntaxError, ValueError ...
        raise InvalidInput(f"{what} could not be decoded ({type(e).__name__}: {e}); the file may be truncated or corrupt.") from e
    return _upright_rgb(image, owned=True)


def _upright_rgb(image, owned: bool):
    """Apply the EXIF orientation and convert to RGB. An image we did not decode is never changed in place."""
    PIL = require_pil()
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # an unreadable EXIF block does not make the pixels unusable
        orientation = 1
    try:
        if orientation not in (None, 1):
            if owned:
                PIL.ImageOps.exif_transpose(image, in_place=True)
            else:
                image = PIL.ImageOps.exif_transpose(image)
                owned = True
        if image.mode == "RGB":
            image.load()  # a closed or lazily opened image fails here, not later in a resize
            return image
        return image.convert("RGB")
    except Exception as e:  # a lazily opened PIL image may still fail to decode here
        raise InvalidInput(f"the image could not be decoded ({type(e).__name__}: {e}).") from e


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, C); channels first wins when both ends could be channels,
    as in transformers, except that 3 channels last beat 1 or 4 first: a (1, N, 3) array is a 1 x N RGB
    image (transformers reads it as a 1-channel image and then fails on the 3-channel normalisation)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise InvalidInput(f"an image array must have 2 or 3 dimensions (H, W[, C]), not shape {array.shape}.")
    if array.shape[-1] == 3 and array.shape[0] != 3:
        return array
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise InvalidInput(f"cannot tell the channels of an image array of shape {array.shape}; "
                       "give (H, W, C) or (C, H, W) with 1, 3 or 4 channels.")


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:  # 0 and 1, as transformers reads them (not 0 and 255)
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidInput(f"an image array must hold integers or floats, not {array.dtype}.")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInput("the image array holds NaN or infinite values.")
    low, high = values.min(), values.max()
    if np.array_equal(values, np.floor(values)) and low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 1:
        # 0..1 intensities: scaled and truncated to bytes, as transformers does before PIL resizing.
        return (values * 255).astype(np.float32).astype(np.uint8)
    raise InvalidInput(f"image array values must be integers in 0..255 or floats in 0..1, not {low}..{high}.")


def _from_array(array: np.ndarray):
    PIL = require_pil()
    pixels = _channels_last(np.asarray(array))
    if pixels.size == 0:
        raise InvalidInput(f"the image array is empty (shape {array.shape}).")
    pixels = _as_uint8(pixels)
    channels = pixels.shape[-1]
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif channels == 4:
        pixels = _composite_on_white(pixels)
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))  # (H, W, 3) uint8: RGB


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3): transparent pixels become white, as transformers' convert_to_rgb does."""
    alpha = rgba[..., 3:4] / 255
    return np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)
