"""Waveforms -> model features: Whisper's log-mel spectrogram, Wav2Vec2's normalisation, and the
feature extractor of a checkpoint. The audio constants (16 kHz, Whisper's STFT and 30 s windows) live here.

Reading inputs (files, URLs, bytes, arrays; decoding and resampling) is processing/audio_io.py's.

1. Whisper: `log_mel_spectrogram` in torch, on any device, for one waveform or a batch; equal to
   transformers' WhisperFeatureExtractor (which follows openai/whisper `audio.py`).
2. Wav2Vec2: `zero_mean_unit_var_norm`, equal to Wav2Vec2FeatureExtractor's `do_normalize`.

`FeatureExtractor.from_folder` reads a checkpoint's settings (preprocessor_config.json, or the
"feature_extractor" entry of a transformers 5 processor_config.json) and gives per-item features
for the automatic-speech-recognition pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import flag, number, positive_int
from ..config import known_keys, read_json_object
from ..errors import CheckpointError, InvalidInput, UnsupportedModel
from .audio_io import AudioItem, load_audio_item, waveform_from_array

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


# ---------------------------------------------------------------------------------------------
# Whisper log-mel spectrogram
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
# Wav2Vec2 normalisation
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
        values.update(known_keys(settings, fields, skip_none=True))
        extractor = cls(**values)
        extractor._validate(source)
        return extractor

    def _validate(self, source: str) -> None:
        whisper_only = ("hop_length", "n_fft", "chunk_length") if self.kind == "whisper" else ()
        for name in ("sampling_rate", "feature_size") + whisper_only:
            positive_int(f"{source}: {name}", getattr(self, name), error=CheckpointError)
        for name in ("padding_value", "dither"):
            number(f"{source}: {name}", getattr(self, name), error=CheckpointError)
        for name in ("do_normalize", "return_attention_mask"):
            flag(f"{source}: {name}", getattr(self, name), allow_none=False, error=CheckpointError)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "FeatureExtractor":
        """A checkpoint folder's feature extractor.

        Reads, in transformers' order: the "feature_extractor" (or "audio_processor") entry of
        processor_config.json (the transformers 5 `save_pretrained` layout), then
        preprocessor_config.json. A Whisper folder with neither gets Whisper's defaults, with the mel
        bins of config.json's num_mel_bins (a model_type "whisper" config.json) or of model.bin's first
        convolution (a CTranslate2 export).
        """
        from ..formats import ct2  # imports processing.audio's constants: imported here, not above

        folder = Path(folder)
        config = read_json_object(folder / "config.json") or {}
        model_type = config.get("model_type")
        processor = read_json_object(folder / "processor_config.json") or {}
        nested = processor.get("feature_extractor", processor.get("audio_processor"))
        if isinstance(nested, dict):
            return cls.from_dict(nested, model_type=model_type, source=f"{folder / 'processor_config.json'}")
        settings = read_json_object(folder / "preprocessor_config.json")
        if settings is not None:
            return cls.from_dict(settings, model_type=model_type, source=f"{folder / 'preprocessor_config.json'}")
        if model_type == "whisper":
            return cls.whisper(positive_int(f"{folder / 'config.json'}: num_mel_bins",
                                            config.get("num_mel_bins", N_MELS), error=CheckpointError))
        if ct2.is_ct2_folder(folder):
            return cls.from_dict(ct2.preprocessor_config(folder), source=f"{folder} (CTranslate2)")
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
                               f"{type(audio).__name__}; load other inputs with audio_io.load_audio first.")
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
