"""Audio inputs -> waveforms -> model features, with no system ffmpeg.

Three stages, each a plain function:

1. `load_audio` / `load_audio_item`: a path, an http(s) URL, the bytes of a file, an array, a torch
   tensor or a `{"raw" | "array": ..., "sampling_rate": ...}` dict -> a float32 mono waveform
   `(samples,)` at the model's rate. Files are decoded by soundfile (libsndfile: wav, flac,
   ogg/vorbis/opus, mp3), then by PyAV (its own bundled ffmpeg libraries: m4a/aac, webm/opus and
   anything else) when soundfile does not know the format; channels are averaged; other rates are
   resampled with soxr (HQ), as librosa and transformers' soundfile backend do.
2. Whisper: `log_mel_spectrogram` in torch, on any device, for one waveform or a batch; equal to
   transformers' WhisperFeatureExtractor (which follows openai/whisper `audio.py`).
3. Wav2Vec2: `zero_mean_unit_var_norm`, equal to Wav2Vec2FeatureExtractor's `do_normalize`.

`FeatureExtractor.from_folder` reads a checkpoint's settings (preprocessor_config.json, or the
"feature_extractor" entry of a transformers 5 processor_config.json) and gives per-item features
for the automatic-speech-recognition pipeline.

Every bad input raises `InvalidInput` saying what was wrong; a missing optional package raises
`MissingDependency` naming the extra to install.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInput, MissingDependency, UnsupportedModel
from .sources import is_file_object, read_file_object

# Whisper's fixed front end (openai/whisper audio.py; transformers' WhisperFeatureExtractor defaults).
SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # samples per STFT window: 25 ms
HOP_LENGTH = 160  # samples between STFT frames: 10 ms
CHUNK_LENGTH = 30  # seconds of audio in one Whisper input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in one Whisper input
N_MELS = 80  # mel bins of every Whisper model before large-v3 (which has 128)
MEL_FMAX = 8000.0  # Hz: the top of Whisper's mel filters, whatever the sampling rate
LOG_MEL_FLOOR = 1e-10  # power floor before log10
LOG_MEL_RANGE = 8.0  # log10 units kept below the loudest bin (80 dB)

WAV2VEC2_EPSILON = 1e-7  # added to the variance before the square root (Wav2Vec2FeatureExtractor)

# Limits on what one input may be. Module attributes, read at call time, so an application can
# change them: `lightpipe.processing.audio.MAX_DURATION_S = 48 * 3600`.
MAX_DURATION_S = 24 * 3600  # longest audio accepted, in seconds (24 h is 5.5 GB of float32 at 16 kHz)
MAX_DOWNLOAD_BYTES = 2 * 1024**3  # largest file fetched from a URL
DEFAULT_TIMEOUT_S = 60.0  # URL fetch timeout when none is given, so a stalled server never hangs a call

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
# Stage 1: any input -> float32 mono waveform at the model's rate
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
        `timeout` seconds per network wait, DEFAULT_TIMEOUT_S when None); the bytes of an audio file;
        an open binary file of them (open(path, "rb"), io.BytesIO);
        a numpy array or torch tensor of samples already at `sampling_rate` ((samples,), or
        (channels, samples) with at most 2 channels, averaged); or a dict {"raw" or "array": array,
        "sampling_rate": its rate}, resampled. Integer samples are taken as values, not rescaled
        (as transformers does).
    Use `load_audio_item` to also get a dict's "stride" and extra keys.
    """
    return load_audio_item(inputs, sampling_rate, timeout=timeout).array


def load_audio_item(inputs: Any, sampling_rate: int, *, timeout: float | None = None) -> AudioItem:
    """Like `load_audio`, keeping what a dict input carries besides the audio (see `AudioItem`)."""
    target = _check_target_rate(sampling_rate)
    if isinstance(inputs, dict):
        return _from_dict(inputs, target)
    if isinstance(inputs, str) and inputs.startswith(("http://", "https://")):
        return AudioItem(decode_audio(fetch_url(inputs, timeout), target, name=inputs))
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


def _check_target_rate(sampling_rate: Any) -> int:
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise InvalidInput(f"sampling_rate must be a positive integer (Hz), not {sampling_rate!r}.")
    return int(sampling_rate)


def _check_input_rate(rate: Any) -> int | float:
    """The rate a caller says an array is at: a positive, finite number of Hz."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"the dict's 'sampling_rate' must be a positive number of Hz, not {rate!r}.")
    if not math.isfinite(rate) or rate <= 0:
        raise InvalidInput(f"the dict's 'sampling_rate' must be a positive number of Hz, not {rate!r}.")
    return int(rate) if float(rate).is_integer() else float(rate)


def _from_dict(inputs: dict, target: int) -> AudioItem:
    """transformers' dict form: {"raw" | "array": samples, "sampling_rate": Hz, "stride"?: (left, right), ...}."""
    if "sampling_rate" not in inputs or ("raw" not in inputs and "array" not in inputs):
        raise InvalidInput(
            "a dict audio input needs a 'raw' (or 'array') key holding the samples as a numpy array or torch "
            f"tensor and a 'sampling_rate' key with their rate in Hz; got the keys {sorted(map(str, inputs))}."
        )
    extra = dict(inputs)  # never modify the caller's dict
    stride = extra.pop("stride", None)
    raw = extra.pop("raw", None)
    if raw is None:
        extra.pop("path", None)  # the `datasets` Audio feature's file name: not audio, not an output
        raw = extra.pop("array", None)
    rate = _check_input_rate(extra.pop("sampling_rate"))
    if not isinstance(raw, (np.ndarray, torch.Tensor)):
        raise InvalidInput(
            f"the dict's audio must be a numpy array or torch tensor of samples, not {type(raw).__name__}."
        )
    array = waveform_from_array(raw, rate, target)
    return AudioItem(array, _rescale_stride(stride, rate, target, array.shape[0]), extra)


def _rescale_stride(stride: Any, rate: float, target: int, n_samples: int) -> tuple[int, int, int] | None:
    if stride is None:
        return None
    if (not isinstance(stride, (tuple, list)) or len(stride) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in stride)):
        raise InvalidInput(f"'stride' must be two non-negative sample counts (left, right), not {stride!r}.")
    ratio = target / rate
    left, right = int(round(stride[0] * ratio)), int(round(stride[1] * ratio))
    if left + right > n_samples:
        raise InvalidInput(f"'stride' {tuple(stride)} is longer than the audio ({n_samples} samples at {target} Hz).")
    return (n_samples, left, right)


def waveform_from_array(samples: np.ndarray | torch.Tensor, rate: float, target: int) -> np.ndarray:
    """User samples at `rate` Hz -> checked float32 mono (samples,) at `target` Hz.

    1-D is mono; 2-D is read as (channels, samples) with at most 2 channels and averaged, the layout
    transformers' pipeline reads (it refuses to guess which axis holds channels otherwise).
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
        array = array.astype(np.float32, copy=False).mean(axis=0)
    return _finish(array.astype(np.float32, copy=False), rate, target, "the audio array")


def _finish(mono: np.ndarray, rate: float, target: int, what: str) -> np.ndarray:
    """Checks every waveform passes, then resampling to the model's rate."""
    if mono.shape[0] == 0:
        raise InvalidInput(f"{what} is empty (0 samples).")
    if mono.shape[0] / rate > MAX_DURATION_S:
        raise InvalidInput(
            f"{what} lasts {mono.shape[0] / rate / 3600:.1f} h, longer than the {MAX_DURATION_S / 3600:g} h limit "
            "(lightpipe.processing.audio.MAX_DURATION_S); split it into parts."
        )
    if not np.isfinite(mono).all():
        raise InvalidInput(f"{what} contains NaN or infinite samples.")
    return np.ascontiguousarray(resample(mono, rate, target))


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


def fetch_url(url: str, timeout: float | None = None) -> bytes:
    """The bytes at an http(s) URL. `timeout` (seconds, DEFAULT_TIMEOUT_S when None) bounds each network
    wait and, checked between reads, the whole download. Any failure -> InvalidInput naming the URL."""
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, not {timeout!r}.")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "lightpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
                raise InvalidInput(
                    f"{url} is {int(declared)} bytes, more than MAX_DOWNLOAD_BYTES ({MAX_DOWNLOAD_BYTES})."
                )
            chunks, size = [], 0
            while True:
                # read1 returns after one network read, so a server that drips bytes cannot hold a
                # read() open past the deadline checked below
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise InvalidInput(f"{url} is larger than MAX_DOWNLOAD_BYTES ({MAX_DOWNLOAD_BYTES} bytes).")
                if time.monotonic() > deadline:
                    raise InvalidInput(f"downloading {url} took longer than the {timeout:g} s timeout.")
            if response.length:  # read1 ends quietly when the server closes early; the missing bytes show here
                raise InvalidInput(f"could not download audio from {url}: the connection closed after {size} bytes, "
                                   f"{response.length} short of its Content-Length.")
    except urllib.error.HTTPError as e:
        raise InvalidInput(f"could not download audio from {url}: HTTP {e.code} {e.reason}.") from e
    except urllib.error.URLError as e:
        raise InvalidInput(f"could not download audio from {url}: {e.reason}.") from e
    except (http.client.HTTPException, OSError, ValueError) as e:  # closed connections, socket timeouts, bad URLs
        if isinstance(e, InvalidInput):
            raise
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise InvalidInput(f"could not download audio from {url}: {reason} (timeout {timeout:g} s).") from e
    data = b"".join(chunks)
    if not data:
        raise InvalidInput(f"the download from {url} is empty (0 bytes).")
    return data


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
        if handle.frames / rate > MAX_DURATION_S:
            raise InvalidInput(
                f"{described} lasts {handle.frames / rate / 3600:.1f} h, longer than the {MAX_DURATION_S / 3600:g} h "
                "limit (lightpipe.processing.audio.MAX_DURATION_S); split it into parts."
            )
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
                if rate and total / rate > MAX_DURATION_S:
                    raise InvalidInput(
                        f"{described} lasts longer than the {MAX_DURATION_S / 3600:g} h limit "
                        "(lightpipe.processing.audio.MAX_DURATION_S); split it into parts."
                    )
            chunks.extend(out.to_ndarray() for out in converter.resample(None))
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, InvalidInput):
                raise
            raise InvalidInput(f"{described} is truncated or corrupt: {_reason(e)}{because}.") from e
    if not chunks or rate is None or sum(c.shape[1] for c in chunks) == 0:
        raise InvalidInput(f"{described} contains no audio samples{because}.")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


# ---------------------------------------------------------------------------------------------
# Stage 2: Whisper log-mel spectrogram
# ---------------------------------------------------------------------------------------------


def hertz_to_mel(hertz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz (3 mels per 200 Hz), logarithmic
    above (27 mels per factor 6.4 in frequency)."""
    hertz = np.asarray(hertz, dtype=np.float64)
    linear = 3.0 * hertz / 200.0
    logarithmic = 15.0 + np.log(np.maximum(hertz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hertz >= 1000.0, logarithmic, linear)


def mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    """The inverse of `hertz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    linear = 200.0 * mels / 3.0
    logarithmic = 1000.0 * np.exp((mels - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mels >= 15.0, logarithmic, linear)


def mel_filter_bank(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                    f_max: float = MEL_FMAX) -> np.ndarray:
    """Triangular mel filters, float64 (n_mels, n_fft // 2 + 1), applied to a power spectrogram.

    Filter i rises from mel point i to i+1 and falls to i+2 (n_mels + 2 points evenly spaced in
    Slaney mels between f_min and f_max), and is divided by its width in Hz / 2 ("slaney" norm) so
    every band holds about the same energy.
    """
    fft_hertz = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)  # (n_freqs,) centre of each FFT bin
    points = mel_to_hertz(np.linspace(hertz_to_mel(f_min), hertz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]  # (n_mels, 1) each
    rising = (fft_hertz[None, :] - lower) / (centre - lower)  # (n_mels, n_freqs)
    falling = (upper - fft_hertz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (upper - lower))


@functools.lru_cache(maxsize=16)
def _mel_filters(n_mels: int, n_fft: int, sampling_rate: int) -> torch.Tensor:
    return torch.from_numpy(mel_filter_bank(n_mels, n_fft, sampling_rate)).float()


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Whisper's mel filter bank as a float32 tensor (n_mels, n_fft // 2 + 1), cached per size."""
    return _mel_filters(n_mels, n_fft, sampling_rate).to(device or "cpu")


def pad_or_trim(audio: np.ndarray | torch.Tensor, length: int = N_SAMPLES, padding_value: float = 0.0):
    """Pad with `padding_value` or cut the last axis to `length` samples (Whisper's 30 s window)."""
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n == length:
        return audio
    if isinstance(audio, torch.Tensor):
        return torch.nn.functional.pad(audio, (0, length - n), value=padding_value)
    widths = [(0, 0)] * (audio.ndim - 1) + [(0, length - n)]
    return np.pad(audio, widths, constant_values=padding_value)


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = N_MELS, *, n_fft: int = N_FFT,
                        hop_length: int = HOP_LENGTH, sampling_rate: int = SAMPLE_RATE, dither: float = 0.0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Whisper's log-mel spectrogram of (samples,) -> (n_mels, samples // hop_length), or of a batch
    (B, samples) -> (B, n_mels, samples // hop_length); float32, on `device` (the input's when None).

    The audio is used as given: pad it to N_SAMPLES first for a standard 30 s input (`pad_or_trim`).
    Steps: periodic Hann STFT (centred, reflect-padded), power, mel filters, log10 of max(power,
    1e-10), everything more than 8 (80 dB) below the item's loudest bin raised to that floor, then
    (x + 4) / 4. The last STFT frame is dropped, as Whisper does. `dither` > 0 adds Gaussian noise
    of that standard deviation first (transformers' torch path), which makes results random.
    """
    x = torch.as_tensor(audio, device=device).to(dtype=torch.float32)
    if x.dim() not in (1, 2):
        raise InvalidInput(f"log_mel_spectrogram takes (samples,) or (batch, samples), not shape {tuple(x.shape)}.")
    if x.shape[-1] <= n_fft // 2:
        raise InvalidInput(f"audio of {x.shape[-1]} samples is too short for a spectrogram: it needs more than "
                           f"{n_fft // 2} samples (pad it first).")
    if dither:
        x = x + dither * torch.randn(x.shape, dtype=x.dtype, device=x.device)
    window = torch.hann_window(n_fft, device=x.device)  # periodic, as np.hanning(n + 1)[:-1]
    stft = torch.stft(x, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (..., n_fft // 2 + 1, frames): last frame dropped
    mel = mel_filters(n_mels, n_fft, sampling_rate, x.device) @ power  # (..., n_mels, frames)
    log_spec = torch.clamp(mel, min=LOG_MEL_FLOOR).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per item, so batching never changes a result
    log_spec = torch.maximum(log_spec, peak - LOG_MEL_RANGE)
    return (log_spec + 4.0) / 4.0


def frame_mask(n_real: int, n_samples: int, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """(n_samples // hop_length,) long: 1 for frames that start inside the first `n_real` samples,
    0 for frames of padding; transformers' sample mask taken every hop_length samples."""
    frames = torch.arange(n_samples // hop_length) * hop_length
    return (frames < n_real).long()


# ---------------------------------------------------------------------------------------------
# Stage 3: Wav2Vec2 normalisation
# ---------------------------------------------------------------------------------------------


def zero_mean_unit_var_norm(waveform: np.ndarray, length: int | None = None, padding_value: float = 0.0) -> np.ndarray:
    """(samples,) -> float32 (samples,) with zero mean and unit variance over its first `length`
    samples (all when None): (x - mean) / sqrt(var + 1e-7). Samples from `length` on are padding
    and are set to `padding_value`."""
    x = np.asarray(waveform, dtype=np.float32)
    n = x.shape[0] if length is None else int(length)
    real = x[:n].astype(np.float64)
    out = ((x.astype(np.float64) - real.mean()) / np.sqrt(real.var() + WAV2VEC2_EPSILON)).astype(np.float32)
    if n < out.shape[0]:
        out[n:] = padding_value
    return out


# ---------------------------------------------------------------------------------------------
# The feature extractor of a checkpoint
# ---------------------------------------------------------------------------------------------

KINDS = {"WhisperFeatureExtractor": "whisper", "Wav2Vec2FeatureExtractor": "wav2vec2"}
# model_type of config.json -> kind, for preprocessor configs that do not name their type
KIND_OF_MODEL_TYPE = {"whisper": "whisper", "wav2vec2": "wav2vec2", "hubert": "wav2vec2", "wavlm": "wav2vec2",
                      "data2vec-audio": "wav2vec2", "unispeech": "wav2vec2", "unispeech-sat": "wav2vec2",
                      "wav2vec2-conformer": "wav2vec2", "sew": "wav2vec2", "sew-d": "wav2vec2"}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def _is_ctranslate2_whisper(config: dict[str, Any]) -> bool:
    """CTranslate2's Whisper export writes a config.json of decoding settings and no model_type."""
    return "model_type" not in config and {"suppress_ids", "lang_ids"} <= set(config)


@dataclasses.dataclass
class FeatureExtractor:
    """Waveforms -> the model's input features, with a checkpoint's settings.

    kind "whisper": `input_features` log-mel (n_mels, N_FRAMES), optional frame `attention_mask`.
    kind "wav2vec2": `input_values` (samples,), normalised when do_normalize, optional sample
    `attention_mask`. Fields not used by a kind are None (hop_length, n_fft, chunk_length for wav2vec2).
    """

    kind: str
    sampling_rate: int = SAMPLE_RATE
    feature_size: int = N_MELS  # mel bins for Whisper; 1 (raw samples) for Wav2Vec2
    hop_length: int | None = HOP_LENGTH
    n_fft: int | None = N_FFT
    chunk_length: int | None = CHUNK_LENGTH
    padding_value: float = 0.0
    do_normalize: bool = False
    return_attention_mask: bool = False
    dither: float = 0.0

    def __post_init__(self):
        if self.kind not in ("whisper", "wav2vec2"):
            raise UnsupportedModel(f"feature extractor kind must be 'whisper' or 'wav2vec2', not {self.kind!r}.")

    @property
    def n_mels(self) -> int:
        return self.feature_size

    @property
    def n_samples(self) -> int | None:
        """Samples in one Whisper window (chunk_length * sampling_rate); None for wav2vec2."""
        return self.chunk_length * self.sampling_rate if self.kind == "whisper" else None

    @property
    def n_frames(self) -> int | None:
        """Mel frames in one Whisper window (transformers' nb_max_frames); None for wav2vec2."""
        return self.n_samples // self.hop_length if self.kind == "whisper" else None

    @property
    def input_name(self) -> str:
        """The model's main input: "input_features" (whisper) or "input_values" (wav2vec2)."""
        return "input_features" if self.kind == "whisper" else "input_values"

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def whisper(cls, n_mels: int = N_MELS) -> "FeatureExtractor":
        """transformers' WhisperFeatureExtractor defaults with `n_mels` bins."""
        return cls(kind="whisper", feature_size=n_mels)

    @classmethod
    def wav2vec2(cls, *, sampling_rate: int = SAMPLE_RATE, do_normalize: bool = True,
                 return_attention_mask: bool = False, padding_value: float = 0.0) -> "FeatureExtractor":
        """transformers' Wav2Vec2FeatureExtractor (raw samples, feature_size 1) with these settings."""
        return cls(kind="wav2vec2", sampling_rate=sampling_rate, feature_size=1, hop_length=None, n_fft=None,
                   chunk_length=None, padding_value=padding_value, do_normalize=do_normalize,
                   return_attention_mask=return_attention_mask)

    @classmethod
    def from_dict(cls, settings: dict[str, Any], *, model_type: str | None = None,
                  source: str = "the feature-extractor settings") -> "FeatureExtractor":
        """The keys of a preprocessor_config.json. `model_type` (from config.json) decides the kind
        only when the settings do not name their feature_extractor_type."""
        type_name = settings.get("feature_extractor_type")
        if type_name is not None:
            if type_name not in KINDS:
                raise UnsupportedModel(
                    f"{source} has feature_extractor_type {type_name!r}; lightpipe supports {sorted(KINDS)}."
                )
            kind = KINDS[type_name]
        elif model_type in KIND_OF_MODEL_TYPE:
            kind = KIND_OF_MODEL_TYPE[model_type]
        else:
            raise CheckpointError(
                f"{source} names no feature_extractor_type and the model_type {model_type!r} does not imply one; "
                f"add \"feature_extractor_type\" (one of {sorted(KINDS)})."
            )
        values = dataclasses.asdict(cls.whisper() if kind == "whisper" else cls.wav2vec2())
        fields = ("sampling_rate", "feature_size", "padding_value", "return_attention_mask", "dither")
        fields += ("hop_length", "n_fft", "chunk_length") if kind == "whisper" else ("do_normalize",)
        for name in fields:
            if settings.get(name) is not None:
                values[name] = settings[name]
        extractor = cls(**values)
        extractor._validate(source)
        return extractor

    def _validate(self, source: str) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"{source}: {name} must be a positive integer, not {value!r}.")

        whisper_only = ("hop_length", "n_fft", "chunk_length") if self.kind == "whisper" else ()
        for name in ("sampling_rate", "feature_size") + whisper_only:
            positive_int(name)
        for name in ("padding_value", "dither"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CheckpointError(f"{source}: {name} must be a number, not {value!r}.")
        for name in ("do_normalize", "return_attention_mask"):
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"{source}: {name} must be true or false, not {getattr(self, name)!r}.")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "FeatureExtractor":
        """A checkpoint folder's feature extractor.

        Reads, in transformers' order: the "feature_extractor" (or "audio_processor") entry of
        processor_config.json (the transformers 5 `save_pretrained` layout), then
        preprocessor_config.json. A Whisper folder with neither (a model_type "whisper" config.json,
        or a CTranslate2 export) gets Whisper's defaults, with config.json's num_mel_bins.
        """
        folder = Path(folder)
        config = _read_json(folder / "config.json") or {}
        model_type = config.get("model_type")
        processor = _read_json(folder / "processor_config.json") or {}
        nested = processor.get("feature_extractor", processor.get("audio_processor"))
        if isinstance(nested, dict):
            return cls.from_dict(nested, model_type=model_type, source=f"{folder / 'processor_config.json'}")
        settings = _read_json(folder / "preprocessor_config.json")
        if settings is not None:
            return cls.from_dict(settings, model_type=model_type, source=f"{folder / 'preprocessor_config.json'}")
        if model_type == "whisper" or _is_ctranslate2_whisper(config):
            n_mels = config.get("num_mel_bins", N_MELS)
            if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels <= 0:
                raise CheckpointError(
                    f"{folder / 'config.json'}: num_mel_bins must be a positive integer, not {n_mels!r}."
                )
            return cls.whisper(n_mels)
        raise CheckpointError(
            f"{folder} has no preprocessor_config.json (nor a processor_config.json with a \"feature_extractor\" "
            "entry): an audio checkpoint needs its feature-extractor settings."
        )

    # -- features -------------------------------------------------------------------------------

    def load(self, inputs: Any, *, timeout: float | None = None) -> AudioItem:
        """`load_audio_item` at this extractor's sampling rate."""
        return load_audio_item(inputs, self.sampling_rate, timeout=timeout)

    def _waveform(self, audio: np.ndarray | torch.Tensor) -> np.ndarray:
        """A waveform already at this extractor's rate, checked: float32 (samples,)."""
        if not isinstance(audio, (np.ndarray, torch.Tensor)):
            raise InvalidInput(f"features are computed from a numpy array or torch tensor of samples, not "
                               f"{type(audio).__name__}; load other inputs with load_audio first.")
        return waveform_from_array(audio, self.sampling_rate, self.sampling_rate)

    def __call__(self, audio: np.ndarray | torch.Tensor, *, long_form: bool = False,
                 return_attention_mask: bool | None = None) -> dict[str, torch.Tensor]:
        """Features of one waveform (samples,) at `sampling_rate`, without a batch dimension.

        whisper: {"input_features": float32 (n_mels, n_frames)}: the audio zero-padded (padding_value)
            or cut to n_samples (30 s). With long_form=True audio longer than n_samples is kept whole:
            (n_mels, samples // hop_length), as transformers' `truncation=False, padding="longest"`.
            "attention_mask": long (frames,), 1 on frames of real audio, when asked.
        wav2vec2: {"input_values": float32 (samples,)}, zero-mean unit-variance when do_normalize;
            "attention_mask": long (samples,) of ones when asked. Pad batches with padding_value and 0.
        return_attention_mask: None follows the checkpoint's setting (transformers' ASR pipeline
            always asks for it).
        """
        want_mask = self.return_attention_mask if return_attention_mask is None else bool(return_attention_mask)
        waveform = self._waveform(audio)
        if self.kind == "wav2vec2":
            values = zero_mean_unit_var_norm(waveform) if self.do_normalize else waveform
            out = {"input_values": torch.from_numpy(np.array(values, dtype=np.float32))}
            if want_mask:
                out["attention_mask"] = torch.ones(values.shape[0], dtype=torch.long)
            return out
        batch = self._whisper_batch([waveform], long_form, want_mask, None)
        return {name: value[0] for name, value in batch.items()}

    def batch(self, audios: Sequence[np.ndarray | torch.Tensor], *, long_form: bool = False,
              return_attention_mask: bool | None = None, device: torch.device | str | None = None,
              ) -> dict[str, torch.Tensor]:
        """Features of several waveforms at once, with a batch dimension; computed on `device`.

        whisper: "input_features" (B, n_mels, frames): each item padded with padding_value or cut to
            n_samples (frames = n_frames); with long_form=True nothing is cut and all are padded to
            the longest item, at least n_samples (frames = that length // hop_length). Each item's
            features are those of `__call__` on it alone (its own loudness floor), except that padding
            after a long-form item differs from its end being reflected (as in transformers).
            "attention_mask" (B, frames) long when asked.
        wav2vec2: "input_values" (B, longest) padded with padding_value, "attention_mask" (B, longest)
            when asked; equal to transformers' `feature_extractor(list, padding=True)`, which
            normalises each padded row over its real samples when it returns a mask and over the
            whole padded row when it does not.
        """
        if isinstance(audios, (np.ndarray, torch.Tensor)) and audios.ndim == 2:
            audios = list(audios)
        if not isinstance(audios, Sequence) or isinstance(audios, (str, bytes)) or len(audios) == 0:
            raise InvalidInput("batch() takes a non-empty list of waveforms.")
        want_mask = self.return_attention_mask if return_attention_mask is None else bool(return_attention_mask)
        waveforms = [self._waveform(a) for a in audios]
        if self.kind == "wav2vec2":
            return self._wav2vec2_batch(waveforms, want_mask)
        return self._whisper_batch(waveforms, long_form, want_mask, device)

    def _whisper_batch(self, waveforms: list[np.ndarray], long_form: bool, want_mask: bool,
                       device: torch.device | str | None) -> dict[str, torch.Tensor]:
        lengths = [w.shape[0] for w in waveforms]
        width = max(max(lengths), self.n_samples) if long_form else self.n_samples
        padded = np.stack([pad_or_trim(w, width, self.padding_value) for w in waveforms])  # (B, width)
        features = log_mel_spectrogram(torch.from_numpy(padded), self.n_mels, n_fft=self.n_fft,
                                       hop_length=self.hop_length, sampling_rate=self.sampling_rate,
                                       dither=self.dither, device=device)
        out = {"input_features": features}
        if want_mask:
            out["attention_mask"] = torch.stack([frame_mask(min(n, width), width, self.hop_length) for n in lengths]
                                                ).to(features.device)
        return out

    def _wav2vec2_batch(self, waveforms: list[np.ndarray], want_mask: bool) -> dict[str, torch.Tensor]:
        lengths = [w.shape[0] for w in waveforms]
        longest = max(lengths)
        padded = np.full((len(waveforms), longest), self.padding_value, dtype=np.float32)  # (B, longest)
        for row, w in enumerate(waveforms):
            padded[row, : w.shape[0]] = w
        if self.do_normalize:
            for row, n in enumerate(lengths):
                padded[row] = zero_mean_unit_var_norm(padded[row], n if want_mask else None, self.padding_value)
        out = {"input_values": torch.from_numpy(padded)}
        if want_mask:
            out["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        return out
