"""Voice activity detection: where in a recording someone speaks, with the Silero VAD network.

    from lightpipe.audio import speech_regions
    speech_regions("meeting.wav")                 # [{'start': 0.93, 'end': 4.286}, ...] in seconds
    speech_regions(samples, 8000, threshold=0.6)  # a numpy array / torch tensor at 8 kHz

`speech_probabilities` gives the network's speech probability for every 32 ms window; `speech_regions`
turns them into regions by the rules of the reference `get_speech_timestamps` (silero-vad 6): a region
opens on a window at or above `threshold`, closes after `min_silence_duration_ms` below `neg_threshold`,
is dropped when not longer than `min_speech_duration_ms`, is split at its longest inner silence (or cut
hard) when longer than `max_speech_duration_s`, and is padded by `speech_pad_ms` on each side (half
the gap each when two regions are closer than twice the padding).

`vad_options(vad_parameters)` checks a user's `vad_parameters` dict and fills the defaults used when VAD
filters audio for Whisper (faster-whisper's: no minimum speech, 2 s of silence to close, 400 ms of
padding), so that `speech_regions(audio, 16000, **vad_options(params))` does what faster-whisper's
`vad_filter=True, vad_parameters=params` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .checks import number, probability
from .errors import InvalidInput

# The reference's rule: a silence must be longer than this to be a place where an over-long region is split.
MIN_SILENCE_AT_MAX_SPEECH_MS = 98

SPEECH_REGION_DEFAULTS: dict[str, Any] = {
    "threshold": 0.5,
    "neg_threshold": None,
    "min_speech_duration_ms": 250,
    "min_silence_duration_ms": 100,
    "speech_pad_ms": 30,
    "max_speech_duration_s": float("inf"),
}

# What VAD filtering before Whisper uses when the user gives no vad_parameters (faster-whisper's VadOptions).
WHISPER_VAD_DEFAULTS: dict[str, Any] = {
    "threshold": 0.5,
    "neg_threshold": None,
    "min_speech_duration_ms": 0,
    "min_silence_duration_ms": 2000,
    "speech_pad_ms": 400,
    "max_speech_duration_s": float("inf"),
}


# -------------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------------


def speech_regions(audio: Any, sampling_rate: int = 16000, *, threshold: float = 0.5,
                   neg_threshold: float | None = None, min_speech_duration_ms: float = 250,
                   min_silence_duration_ms: float = 100, speech_pad_ms: float = 30,
                   max_speech_duration_s: float = float("inf")) -> list[dict[str, float]]:
    """The spans of `audio` that hold speech: a list of {"start": seconds, "end": seconds}, in order.

    audio: a numpy array or torch tensor of samples at `sampling_rate` Hz ((samples,), or (channels, samples)
        with 1 or 2 channels, averaged); float samples in [-1, 1], or integer PCM (int16 is divided by
        32768, other widths likewise), so int16 and the same audio as float give the same regions. Or a
        file path, the bytes of an audio file, an open binary file, or a {"raw"/"array": samples,
        "sampling_rate": Hz} dict: these carry their own rate and `sampling_rate` is not used.
    sampling_rate: the rate of array input. 16 kHz and 8 kHz run the network of that rate; any other rate
        is resampled to 16 kHz. The seconds are on the input's timeline.
    threshold: a window is speech at or above this probability (0 to 1).
    neg_threshold: inside speech, a window is silence below this; default max(threshold - 0.15, 0.01).
    min_speech_duration_ms: regions not longer than this are dropped.
    min_silence_duration_ms: silence that closes a region (shorter pauses stay inside it).
    speech_pad_ms: padding added to each side of a region.
    max_speech_duration_s: longer regions are split at their longest silence of more than 98 ms, else cut.

    Raises InvalidInput for bad audio or parameters.
    """
    options = _check_options(threshold=threshold, neg_threshold=neg_threshold,
                             min_speech_duration_ms=min_speech_duration_ms,
                             min_silence_duration_ms=min_silence_duration_ms, speech_pad_ms=speech_pad_ms,
                             max_speech_duration_s=max_speech_duration_s)
    waveform, rate, duration = _load(audio, sampling_rate)
    probs = _probabilities(waveform, rate)
    regions = regions_from_probabilities(probs, waveform.shape[0], rate, **options)
    return [{"start": min(start / rate, duration), "end": min(end / rate, duration)} for start, end in regions]


def speech_probabilities(audio: Any, sampling_rate: int = 16000) -> tuple[np.ndarray, float]:
    """The network's speech probability for each window of `audio`: (float32 array (windows,), window seconds).

    Window i covers [i * window_seconds, (i + 1) * window_seconds) of the input's timeline (32 ms windows).
    `audio` and `sampling_rate` are read as by `speech_regions`.
    """
    waveform, rate, _ = _load(audio, sampling_rate)
    from .models.silero_vad import SHAPES

    return _probabilities(waveform, rate), SHAPES[rate].window / rate


def vad_options(vad_parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A user's `vad_parameters` checked and completed with the Whisper VAD defaults (`WHISPER_VAD_DEFAULTS`).

    Keys: threshold, neg_threshold, min_speech_duration_ms, min_silence_duration_ms, speech_pad_ms,
    max_speech_duration_s. An unknown key or a bad value raises InvalidInput. The result is keyword
    arguments for `speech_regions`.
    """
    if vad_parameters is None:
        vad_parameters = {}
    if not isinstance(vad_parameters, Mapping):
        raise InvalidInput(
            f"vad_parameters must be a dict of VAD settings or None, not {type(vad_parameters).__name__}.")
    unknown = sorted(str(k) for k in vad_parameters if k not in WHISPER_VAD_DEFAULTS)
    if unknown:
        raise InvalidInput(f"vad_parameters has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"the accepted keys are {', '.join(WHISPER_VAD_DEFAULTS)}.")
    return _check_options(**{**WHISPER_VAD_DEFAULTS, **vad_parameters}, prefix="vad_parameters")


# -------------------------------------------------------------------------------------------------
# Probabilities -> regions (the reference's rules)
# -------------------------------------------------------------------------------------------------


def regions_from_probabilities(probs: Any, n_samples: int, sampling_rate: int, *, threshold: float = 0.5,
                               neg_threshold: float | None = None, min_speech_duration_ms: float = 250,
                               min_silence_duration_ms: float = 100, speech_pad_ms: float = 30,
                               max_speech_duration_s: float = float("inf")) -> list[tuple[int, int]]:
    """Per-window speech probabilities of an `n_samples` signal -> [(start, end)] in samples, padded.

    The windows are 512 samples at 16 kHz and 256 at 8 kHz. Parameters as `speech_regions` (unchecked here).
    """
    window = 512 if sampling_rate == 16000 else 256
    min_speech = sampling_rate * min_speech_duration_ms / 1000
    pad = sampling_rate * speech_pad_ms / 1000
    max_speech = sampling_rate * max_speech_duration_s - window - 2 * pad
    min_silence = sampling_rate * min_silence_duration_ms / 1000
    split_silence = sampling_rate * MIN_SILENCE_AT_MAX_SPEECH_MS / 1000
    if neg_threshold is None:
        neg_threshold = max(threshold - 0.15, 0.01)

    regions: list[list[int]] = []
    start: int | None = None  # the open region's first sample; None outside speech
    silence_from = 0  # first sample of the silence running inside the open region; 0: none
    pauses: list[tuple[int, int]] = []  # (first sample, length) of the open region's past silences, split points

    for i, p in enumerate(np.asarray(probs, dtype=np.float64).tolist()):
        here = window * i
        if p >= threshold:
            if silence_from:  # speech again after a silence
                if here - silence_from > split_silence:
                    pauses.append((silence_from, here - silence_from))
                silence_from = 0
            if start is None:
                start = here
                continue
        if start is not None and here - start > max_speech:
            if pauses:  # split at the longest past silence (the first one if several are as long)
                cut, length = max(pauses, key=lambda pause: pause[1])
                regions.append([start, cut])
                start = cut + length if length < here else None
                silence_from, pauses = 0, []
            else:  # no silence to split at: cut here
                regions.append([start, here])
                start, silence_from, pauses = None, 0, []
                continue
        if start is not None and p < neg_threshold:
            if not silence_from:
                silence_from = here
            if here - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                regions.append([start, silence_from])
            start, silence_from, pauses = None, 0, []
    if start is not None and n_samples - start > min_speech:
        regions.append([start, n_samples])

    for i, region in enumerate(regions):
        if i == 0:
            region[0] = int(max(0, region[0] - pad))
        if i + 1 < len(regions):
            after = regions[i + 1]
            gap = after[0] - region[1]
            if gap < 2 * pad:  # closer than two paddings: each side takes half the gap
                region[1] += int(gap // 2)
                after[0] = int(max(0, after[0] - gap // 2))
            else:
                region[1] = int(min(n_samples, region[1] + pad))
                after[0] = int(max(0, after[0] - pad))
        else:
            region[1] = int(min(n_samples, region[1] + pad))
    return [(start, end) for start, end in regions]


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def _check_options(*, threshold, neg_threshold, min_speech_duration_ms, min_silence_duration_ms, speech_pad_ms,
                   max_speech_duration_s, prefix: str | None = None) -> dict[str, Any]:
    """The six region settings checked (InvalidInput naming the bad one), as keyword arguments."""
    def name(key: str) -> str:
        return f"{prefix}[{key!r}]" if prefix else key

    out = {
        "threshold": probability(name("threshold"), threshold),
        "neg_threshold": probability(name("neg_threshold"), neg_threshold, allow_none=True),
        "min_speech_duration_ms": number(name("min_speech_duration_ms"), min_speech_duration_ms, minimum=0,
                                         unit="milliseconds"),
        "min_silence_duration_ms": number(name("min_silence_duration_ms"), min_silence_duration_ms, minimum=0,
                                          unit="milliseconds"),
        "speech_pad_ms": number(name("speech_pad_ms"), speech_pad_ms, minimum=0, unit="milliseconds"),
    }
    if not (isinstance(max_speech_duration_s, float) and max_speech_duration_s == math.inf):
        number(name("max_speech_duration_s"), max_speech_duration_s, positive=True, unit="seconds")
        shortest = 0.032 + 2 * out["speech_pad_ms"] / 1000
        if max_speech_duration_s <= shortest:
            raise InvalidInput(
                f"{name('max_speech_duration_s')} must be longer than one 32 ms window plus twice speech_pad_ms "
                f"({shortest:g} s), or float('inf'); got {max_speech_duration_s!r}.")
    out["max_speech_duration_s"] = max_speech_duration_s
    return out


def _integer_to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1): signed by 2**(bits - 1) (int16: 32768), unsigned around its middle."""
    info = np.iinfo(array.dtype)
    half = 2.0 ** (info.bits - 1)
    if info.min < 0:
        return (array.astype(np.float64) / half).astype(np.float32)
    return ((array.astype(np.float64) - half) / half).astype(np.float32)


def _load(audio: Any, sampling_rate: Any) -> tuple[torch.Tensor, int, float]:
    """Any supported input -> (float32 mono waveform at the network's rate, that rate, duration in seconds)."""
    from .models import silero_vad
    from .processing import audio_io

    if isinstance(audio, Mapping) and not isinstance(audio, (str, bytes)):
        samples = audio.get("raw", audio.get("array"))
        if "sampling_rate" not in audio or samples is None:
            raise InvalidInput("a dict audio input needs a 'raw' (or 'array') key holding the samples and a "
                               f"'sampling_rate' key with their rate in Hz; got the keys {sorted(map(str, audio))}.")
        audio, sampling_rate = samples, audio["sampling_rate"]
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        rate = number("sampling_rate", sampling_rate, positive=True, unit="Hz")
        if isinstance(audio, torch.Tensor) and not audio.is_floating_point() and not audio.is_complex() \
                and audio.dtype != torch.bool:
            audio = audio.detach().cpu().numpy()
        if isinstance(audio, np.ndarray) and np.issubdtype(audio.dtype, np.integer):
            audio = _integer_to_float(audio)
        target = int(rate) if rate in silero_vad.native_rates() else 16000
        waveform = audio_io.waveform_from_array(audio, rate, target)
        duration = (audio.shape[-1] if audio.ndim else 0) / rate
    elif isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or audio_io.is_file_object(audio):
        target = 16000
        waveform = audio_io.load_audio(audio, target)
        duration = waveform.shape[0] / target
    else:
        raise InvalidInput(
            "audio must be a numpy array or torch tensor of samples, a file path, the bytes of an audio file (or an "
            f"open binary file), or a {{'raw': array, 'sampling_rate': int}} dict; got {type(audio).__name__}.")
    return torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), target, duration


def _probabilities(waveform: torch.Tensor, rate: int) -> np.ndarray:
    from .models import silero_vad

    return silero_vad.load(rate).speech_probabilities(waveform).numpy()
