"""Audio inputs -> float32 mono waveforms at the model's rate, with no system ffmpeg.

`load_audio` / `load_audio_item`: a path, an http(s) URL, the bytes of a file (or an open binary file), an
array, a torch tensor or a `{"raw" | "array": ..., "sampling_rate": ...}` dict -> a float32 mono waveform
`(samples,)` at the model's rate. Files are decoded by soundfile (libsndfile: wav, flac, ogg/vorbis/opus,
mp3), then by PyAV (its own bundled ffmpeg libraries: m4a/aac, webm/opus and anything else) when soundfile
does not know the format; channels are averaged; other rates are resampled with soxr (HQ), as librosa and
transformers' soundfile backend do. URLs are fetched by `sources.fetch_url`, as images are.

What a model makes of the waveform (log-mel, normalisation) is processing/audio.py's. Every bad input
raises `InvalidInput` saying what was wrong; a missing optional package raises `MissingDependency`
naming the extra to install.
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import number, positive_int
from ..errors import InvalidInput, MissingDependency
from . import limits
from .sources import fetch_url, is_file_object, is_url, read_file_object

# Limits on what one input may be. Module attributes, read at call time, so an application can
# change them: `lightpipe.processing.audio_io.MAX_DURATION_S = 48 * 3600`. A pipeline's or a call's
# max_audio_seconds (processing/limits.py) wins over MAX_DURATION_S.
MAX_DURATION_S = 24 * 3600  # longest audio accepted by default, in seconds (24 h is 5.5 GB of float32 at 16 kHz)
MAX_DOWNLOAD_BYTES = 2 * 1024**3  # largest audio file fetched from a URL

INSTALL_HINT = "pip install 'lightpipe[audio]'"


# ---------------------------------------------------------------------------------------------
# Optional packages
# ---------------------------------------------------------------------------------------------


def _require(module: str, purpose: str):
    """Import an optional package, or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{purpose} needs the `{module}` package: {INSTALL_HINT}") from e


def _optional(module: str):
    """The package if installed, else None (for decoders that have a fallback)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# Any input -> float32 mono waveform at the model's rate
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioItem:
    """One audio input made ready for a model.

    array: float32 (samples,) at the requested sampling rate.
    stride: None, or (samples, left, right) when a dict input carried "stride": (left, right) in
        samples at its own rate; left and right are rescaled to the requested rate, as the
        transformers ASR pipeline does, and tell which ends of the chunk to drop from the output.
    extra: the dict input's other keys (not raw/array/sampling_rate/stride; "path" is dropped when
        the audio came under "array", the `datasets` layout), passed through to the result.
    """

    array: np.ndarray
    stride: tuple[int, int, int] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_audio(inputs: Any, sampling_rate: int, *, timeout: float | None = None) -> np.ndarray:
    """Any supported audio input -> float32 mono waveform, shape (samples,), at `sampling_rate` Hz.

    inputs: a local path (str or pathlib.Path); an "http://" or "https://" URL (fetched with
        `timeout` seconds per network wait, sources.DEFAULT_TIMEOUT_S when None); the bytes of an audio file;
        an open binary file of them (open(path, "rb"), io.BytesIO);
        a numpy array or torch tensor of samples already at `sampling_rate` ((samples,), or
        (channels, samples) with at most 2 channels, averaged); or a dict {"raw" or "array": array,
        "sampling_rate": its rate}, resampled. Integer PCM samples (int8, int16, int32, uint8) are scaled
        to [-1, 1] as a WAV reader scales them (int16 / 32768 ...); float64 is cast to float32.
    Use `load_audio_item` to also get a dict's "stride" and extra keys.
    """
    return load_audio_item(inputs, sampling_rate, timeout=timeout).array


def load_audio_item(inputs: Any, sampling_rate: int, *, timeout: float | None = None) -> AudioItem:
    """Like `load_audio`, keeping what a dict input carries besides the audio (see `AudioItem`)."""
    target = positive_int("sampling_rate", sampling_rate)
    if isinstance(inputs, dict):
        return _from_dict(inputs, target)
    if isinstance(inputs, str) and is_url(inputs):
        return AudioItem(decode_audio(fetch_url(inputs, timeout, max_bytes=MAX_DOWNLOAD_BYTES), target, name=inputs))
    if isinstance(inputs, (str, os.PathLike)):
        return AudioItem(_from_path(Path(os.fspath(inputs)).expanduser(), target))
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        return AudioItem(decode_audio(bytes(inputs), target))
    if is_file_object(inputs):  # open(path, "rb"), io.BytesIO: the bytes of an audio file
        return AudioItem(decode_audio(read_file_object(inputs), target))
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return AudioItem(waveform_from_array(inputs, target, target))
    raise InvalidInput(
        f"audio input must be a file path, an http(s) URL, the bytes of an audio file (or an open binary file), a "
        f"numpy array or torch tensor of samples, or a dict {{'raw': array, 'sampling_rate': int}}; got "
        f"{type(inputs).__name__}."
    )


def _from_dict(inputs: dict, target: int) -> AudioItem:
    """transformers' dict form: {"raw" | "array": samples, "sampling_rate": Hz, "stride"?: (left, right), ...};
    also the rows of a 🤗 datasets Audio column: decoded ones in the numpy or torch format (a 0-d array or
    tensor as "sampling_rate"), in the python format (a list of samples), and undecoded ones
    (`Audio(decode=False)`: {"bytes": file bytes or None, "path": file path}), which are decoded here."""
    if "raw" not in inputs and "array" not in inputs and ("bytes" in inputs or "path" in inputs):
        return _from_file_dict(inputs, target)
    if "sampling_rate" not in inputs or ("raw" not in inputs and "array" not in inputs):
        raise InvalidInput(
            "a dict audio input needs a 'raw' (or 'array') key holding the samples as a numpy array or torch "
            f"tensor and a 'sampling_rate' key with their rate in Hz, or the 'bytes' or 'path' of an audio file; "
            f"got the keys {sorted(map(str, inputs))}."
        )
    extra = dict(inputs)  # never modify the caller's dict
    stride = extra.pop("stride", None)
    raw = extra.pop("raw", None)
    datasets_row = raw is None
    if datasets_row:
        extra.pop("path", None)  # the `datasets` Audio feature's file name: not audio, not an output
        raw = extra.pop("array", None)
    rate = number("the dict's 'sampling_rate'", _scalar(extra.pop("sampling_rate")), positive=True, unit="Hz")
    rate = int(rate) if float(rate).is_integer() else float(rate)
    if datasets_row and isinstance(raw, list) and raw and isinstance(raw[0], numbers.Real):
        try:  # a datasets row in the python format: "array" is a list of floats
            raw = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"the dict's 'array' must be a list of numbers: {e}") from e
    if not isinstance(raw, (np.ndarray, torch.Tensor)):
        raise InvalidInput(
            f"the dict's audio must be a numpy array or torch tensor of samples, not {type(raw).__name__}."
        )
    array = waveform_from_array(raw, rate, target)
    return AudioItem(array, _rescale_stride(stride, rate, target, array.shape[0]), extra)


def _scalar(value: Any) -> Any:
    """A 0-d numpy array or torch tensor (a datasets row in the numpy or torch format) -> its Python number."""
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) and value.ndim == 0:
        return value.item()
    return value


def _from_file_dict(inputs: dict, target: int) -> AudioItem:
    """{"bytes": the file's bytes or None, "path": its path or None}: the bytes when given, else the file at path
    (the rows of a datasets `Audio(decode=False)` column). Other keys are passed through, as for arrays."""
    extra = {k: v for k, v in inputs.items() if k not in ("bytes", "path", "sampling_rate")}
    data, path = inputs.get("bytes"), inputs.get("path")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"the dict's 'bytes' must be the bytes of an audio file, not {type(data).__name__}.")
        return AudioItem(decode_audio(bytes(data), target, name=path if isinstance(path, str) else None), None, extra)
    if isinstance(path, (str, os.PathLike)) and os.fspath(path):
        if isinstance(path, str) and is_url(path):
            raise InvalidInput(f"the dict's 'path' {path!r} is a URL: give the URL itself as the input.")
        return AudioItem(_from_path(Path(os.fspath(path)).expanduser(), target), None, extra)
    raise InvalidInput("a dict audio input with 'bytes' and 'path' needs the bytes of an audio file or its path; "
                       "both are empty.")


def _rescale_stride(stride: Any, rate: float, target: int, n_samples: int) -> tuple[int, int, int] | None:
    if stride is None:
        return None
    if not isinstance(stride, (tuple, list)) or len(stride) != 2:
        raise InvalidInput(f"'stride' must be two non-negative sample counts (left, right), not {stride!r}.")
    counts = [positive_int("each 'stride' count (samples)", s, allow_zero=True) for s in stride]
    ratio = target / rate
    left, right = int(round(counts[0] * ratio)), int(round(counts[1] * ratio))
    if left + right > n_samples:
        raise InvalidInput(f"'stride' {tuple(stride)} is longer than the audio ({n_samples} samples at {target} Hz).")
    return (n_samples, left, right)


# Integer PCM -> float in [-1, 1): (offset, scale) per dtype, sample = (value - offset) / scale. The widths
# audio files and sound cards use; 8-bit PCM is unsigned around 128 (WAV's convention). Other integer dtypes
# (int64, uint16, uint32 ...) name no PCM format and are taken as values, unscaled.
PCM_SCALES = {np.dtype(np.int8): (0, 2.0**7), np.dtype(np.uint8): (128, 2.0**7), np.dtype(np.int16): (0, 2.0**15),
              np.dtype(np.int32): (0, 2.0**31)}


def pcm_to_float(array: np.ndarray) -> np.ndarray:
    """Samples of any numeric dtype -> float32 amplitudes: int8 / int16 / int32 PCM divided by 2**7 / 2**15 / 2**31,
    uint8 centred ((x - 128) / 128), floats (float64 included) cast to float32 as they are."""
    scale = PCM_SCALES.get(array.dtype)
    if scale is not None:
        offset, divisor = scale
        # float64 arithmetic: int32 values are not exact in float32 before the division
        return ((array.astype(np.float64) - offset) / divisor).astype(np.float32)
    return array.astype(np.float32, copy=False)


def waveform_from_array(samples: np.ndarray | torch.Tensor, rate: float, target: int) -> np.ndarray:
    """User samples at `rate` Hz -> checked float32 mono (samples,) at `target` Hz.

    1-D is mono; 2-D is read as (channels, samples) with at most 2 channels and averaged, the layout
    transformers' pipeline reads (it refuses to guess which axis holds channels otherwise); (samples, 2), as
    soundfile.read returns stereo, is refused with a message saying to pass its transpose. More dimensions are
    refused. Integer PCM is scaled to [-1, 1] (see `pcm_to_float`); float64 becomes float32.
    """
    if isinstance(samples, torch.Tensor):
        if samples.is_complex():
            raise InvalidInput("audio samples must be real numbers, not complex.")
        samples = samples.detach().to("cpu")
        if samples.is_floating_point() and samples.dtype != torch.float64:
            samples = samples.float()  # bfloat16 / float16 have no numpy equivalent
        samples = samples.numpy()
    array = np.asarray(samples)
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.dtype == np.bool_ or not numeric:
        raise InvalidInput(f"audio samples must be real numbers (float or int), not an array of dtype {array.dtype}.")
    array = pcm_to_float(array)
    if array.ndim == 0:
        raise InvalidInput("audio must be an array of samples, not a single number.")
    if array.ndim > 2:
        raise InvalidInput(
            f"audio must be (samples,) or (channels, samples); got {array.ndim} dimensions, shape {tuple(array.shape)}."
        )
    if array.ndim == 2:
        if array.shape[0] > 2:
            raise InvalidInput(
                f"2-D audio is read as (channels, samples), and axis 0 has size {array.shape[0]} in shape "
                f"{tuple(array.shape)}. If it is (samples, channels), as soundfile.read returns, pass `array.T`; "
                "if it really has more than 2 channels, mix it down to mono yourself."
            )
        array = array.mean(axis=0)
    return _finish(array, rate, target, "the audio array")


def _finish(mono: np.ndarray, rate: float, target: int, what: str) -> np.ndarray:
    """Checks every waveform passes, then resampling to the model's rate."""
    if mono.shape[0] == 0:
        raise InvalidInput(f"{what} is empty (0 samples).")
    _check_duration(mono.shape[0] / rate, what)
    if not np.isfinite(mono).all():
        raise InvalidInput(f"{what} contains NaN or infinite samples.")
    return np.ascontiguousarray(resample(mono, rate, target))


def _describe_seconds(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.1f} s"


def _check_duration(seconds: float, what: str, *, at_least: bool = False) -> None:
    """InvalidInput when `seconds` of audio pass the limit in force (max_audio_seconds, else MAX_DURATION_S)."""
    limit = limits.max_audio_seconds()
    if limit is not None and seconds > limit:
        lasts = "lasts longer than" if at_least else f"lasts {_describe_seconds(seconds)}, longer than"
        raise InvalidInput(
            f"{what} {lasts} the {_describe_seconds(limit)} limit (max_audio_seconds); split it into parts, or "
            "raise the limit: pipeline(..., max_audio_seconds=...)."
        )


def resample(waveform: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """(samples,) at orig_rate -> (ceil(samples * target_rate / orig_rate),) at target_rate, with soxr HQ.

    The output length is the one librosa gives (transformers' soundfile backend pads or trims to it).
    """
    if orig_rate == target_rate:
        return waveform
    soxr = _require("soxr", "resampling audio")
    length = math.ceil(waveform.shape[0] * target_rate / orig_rate)
    out = soxr.resample(waveform, orig_rate, target_rate, quality="HQ")
    if out.shape[0] < length:
        out = np.pad(out, (0, length - out.shape[0]))
    return out[:length].astype(np.float32, copy=False)


def _from_path(path: Path, target: int) -> np.ndarray:
    if not path.exists():
        raise InvalidInput(f"no audio file at {path}: the path does not exist.")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file; give the path of an audio file.")
    if path.stat().st_size == 0:
        raise InvalidInput(f"the audio file {path} is empty (0 bytes).")
    return decode_audio(str(path), target, name=str(path))



def sniff_format(head: bytes) -> str | None:
    """A best guess at a file's format from its first bytes, for error messages; None if unknown."""
    if head[4:8] == b"ftyp":
        return "m4a/mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm/matroska"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "aac (adts)" if head[1] & 0xF6 == 0xF0 else "mp3"
    return None


def _reason(error: BaseException) -> str:
    """A decoder's error as a short phrase, without object addresses, errno numbers or "Error :"."""
    text = getattr(error, "strerror", None) or str(error)  # PyAV errors: "[Errno N] msg: '<none>'" -> msg
    if text.startswith("Error opening "):  # libsndfile: "Error opening <_io.BytesIO object at 0x..>: msg"
        text = text.split(": ", 1)[-1]
    return text.removeprefix("Error : ").rstrip(". ")


# Formats libsndfile cannot read: without PyAV these are a missing package, not a bad file.
NEEDS_PYAV = ("m4a/mp4", "webm/matroska", "aac (adts)")


def decode_audio(source: str | bytes, target: int, *, name: str | None = None) -> np.ndarray:
    """An audio file (a path, or its bytes) -> float32 mono (samples,) at `target` Hz.

    soundfile first; PyAV when soundfile does not recognise the format. A file soundfile
    recognises but cannot read to the end (a truncated FLAC) is an error, not a partial result.
    """
    what = f"the audio file {name}" if name else "the audio data"
    if isinstance(source, bytes):
        if not source:
            raise InvalidInput(f"{what} is empty (0 bytes).")
        head = source[:64]
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(64)
        except OSError as e:
            raise InvalidInput(f"{what} cannot be read: {e}") from e
    soundfile = _optional("soundfile")
    av = _optional("av")
    if soundfile is None and av is None:
        raise MissingDependency(f"decoding audio files needs soundfile or PyAV: {INSTALL_HINT}")
    kind = sniff_format(head)
    described = f"{what} ({kind})" if kind else what
    soundfile_error = None
    if soundfile is not None:
        decoded, soundfile_error = _decode_soundfile(soundfile, source, described)
        if decoded is not None:
            channels, rate = decoded
            return _finish(channels.mean(axis=0), rate, target, what)
    if av is None:
        if kind in NEEDS_PYAV:
            raise MissingDependency(
                f"soundfile cannot decode {described} ({soundfile_error}); formats such as m4a, aac and webm "
                f"need PyAV: {INSTALL_HINT}"
            )
        raise InvalidInput(f"{what} could not be decoded as audio: {soundfile_error}.")
    channels, rate = _decode_pyav(av, source, described, soundfile_error)
    return _finish(channels.mean(axis=0), rate, target, what)


def _decode_soundfile(soundfile, source: str | bytes, described: str):
    """((channels, samples) float32, rate), None) when decoded; (None, reason) when soundfile does
    not recognise the format. Raises InvalidInput when it recognises the file but cannot read it."""
    try:
        handle = soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (RuntimeError, TypeError, ValueError) as e:  # LibsndfileError is a RuntimeError
        return None, _reason(e)
    with handle:
        rate = handle.samplerate
        if rate <= 0:
            raise InvalidInput(f"{described} declares a sampling rate of {rate} Hz.")
        _check_duration(handle.frames / rate, described)
        try:
            samples = handle.read(dtype="float32", always_2d=True)  # (samples, channels)
        except (RuntimeError, ValueError) as e:
            raise InvalidInput(f"{described} is truncated or corrupt: {_reason(e)}.") from e
    if samples.shape[0] == 0:
        raise InvalidInput(f"{described} contains no audio samples.")
    return (samples.T, rate), None


def _decode_pyav(av, source: str | bytes, described: str, soundfile_error: str | None):
    """The first audio stream decoded by PyAV -> ((channels, samples) float32, rate)."""
    because = f" (soundfile: {soundfile_error})" if soundfile_error else ""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise InvalidInput(f"{described} could not be decoded as audio: {_reason(e)}{because}.") from e
    with container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise InvalidInput(f"{described} has no audio stream.")
        # Planar float keeps the channels apart and the rate as decoded; mixing and resampling
        # happen afterwards in numpy/soxr, exactly as for files soundfile reads.
        converter = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate, total = None, 0
        try:
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                for out in converter.resample(frame):
                    chunks.append(out.to_ndarray())  # (channels, samples)
                    total += chunks[-1].shape[1]
                if rate:
                    _check_duration(total / rate, described, at_least=True)
            chunks.extend(out.to_ndarray() for out in converter.resample(None))
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, InvalidInput):
                raise
            raise InvalidInput(f"{described} is truncated or corrupt: {_reason(e)}{because}.") from e
    if not chunks or rate is None or sum(c.shape[1] for c in chunks) == 0:
        raise InvalidInput(f"{described} contains no audio samples{because}.")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate
