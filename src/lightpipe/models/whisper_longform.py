"""Whisper's sequential decoding: an audio read window after window, each window starting where the text of the
one before it stopped (the "seek" loop of transformers' WhisperForConditionalGeneration.generate, after
openai/whisper's `transcribe`).

Whisper hears at most 30 s at a time (`model.config.frames` = 3000 mel frames, two per encoder position). Decoded
with timestamp tokens, a window gives segments, `<|t0|> text <|t1|>` pairs:

- when its tokens end with a lone timestamp (nothing said after it), or hold no pair at all, every token is kept and
  the next window starts where this one ended;
- when they end inside a segment (a pair followed by text that the window cut off), the tokens after the last pair
  are thrown away and the next window starts at that pair's time, so that the cut sentence is heard whole.

transformers runs this loop for every audio it decodes, short ones too: a clip padded to 30 s whose tokens end
inside a segment is decoded again from the last pair. lightpipe does the same for every window the pipeline
gives (an unchunked audio, short or long, or one chunk of a chunked one), so that its results equal the
reference's in all of these cases. Audio longer than a window always decodes with timestamps (the loop needs
them); the caller decides whether to show them. Without timestamps a short window is decoded once.

Each audio is decoded as transformers decodes it alone (batch_size=1): its own frame count bounds the loop and
its windows are its own features, cut and zero-padded to 30 s. Audios decoded together only share the forward
passes, so batching never changes a result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInput
from ..generation.generate import GenerationConfig, GenerationOutput
from .whisper import WhisperForConditionalGeneration, detect_language, needs_language_detection, whisper_generate


@dataclasses.dataclass
class Transcript:
    """What sequential decoding keeps of one audio.

    tokens: the kept tokens of every window in order, without prompts and end-of-text tokens.
    token_times: (len(tokens),) float32 start time of each token in seconds from the audio's start (word timestamps).
    language: the language token of the prompt (given or detected), None for English-only models.
    """

    tokens: list[int]
    token_times: torch.Tensor | None
    language: int | None


def transcribe(model: WhisperForConditionalGeneration, features: torch.Tensor, frames: Sequence[int],
               generation_config: GenerationConfig, *, timestamps: bool = False, word_timestamps: bool = False,
               audio_frames: Sequence[int] | None = None, time_precision: float = 0.02, language=None,
               task: str | None = None, prompt_ids: Sequence[int] | None = None,
               temperature: float | None = None) -> list[Transcript]:
    """Decode each audio of `features` (B, n_mels, width) window by window.

    frames: each audio's own feature frames (at most `width`): the loop ends when its windows cover them.
    timestamps: decode with timestamp tokens (always done for audio longer than one window).
    word_timestamps: also align each token with the audio (needs generation_config.output_cross_attentions and
        alignment_heads); audio_frames, the frames of real audio in each item (its attention mask), cut the
        alignment to the audio as transformers' num_frames does.
    time_precision: seconds per timestamp step (30 s / 1500 encoder positions).
    language, task, prompt_ids, temperature: as `whisper_generate`; a language that must be detected is detected
        once per audio, on its first window, and kept for the others.
    """
    batch = features.shape[0]
    if len(frames) != batch or (audio_frames is not None and len(audio_frames) != batch):
        raise InvalidInput(f"frames and audio_frames must hold one count per audio ({batch}).")
    window = model.config.frames
    with_timestamps = [bool(timestamps) or int(f) > window for f in frames]
    if len(set(with_timestamps)) > 1:  # different prompts and rules: decode the two kinds apart
        results: list[Transcript | None] = [None] * batch
        for kind in (False, True):
            rows = [r for r in range(batch) if with_timestamps[r] == kind]
            part = transcribe(model, features[rows], [frames[r] for r in rows], generation_config, timestamps=kind,
                              word_timestamps=word_timestamps, time_precision=time_precision, language=language,
                              audio_frames=None if audio_frames is None else [audio_frames[r] for r in rows],
                              task=task, prompt_ids=prompt_ids, temperature=temperature)
            for r, transcript in zip(rows, part):
                results[r] = transcript
        return results  # type: ignore[return-value]
    return _SeekLoop(model, features, frames, generation_config, with_timestamps[0], word_timestamps, audio_frames,
                     time_precision, dict(language=language, task=task, prompt_ids=prompt_ids,
                                          temperature=temperature)).run()


class _SeekLoop:
    """The state of one batch of audios decoded window by window: where each one stands (`seek`, in mel frames),
    what it kept, and the decoding length limit, which grows window after window as transformers lets it."""

    def __init__(self, model, features, frames, config, timestamps, word_timestamps, audio_frames, time_precision,
                 options):
        self.model, self.features, self.config = model, features, config
        self.frames = [int(f) for f in frames]
        self.timestamps, self.word_timestamps = timestamps, word_timestamps
        self.audio_frames = None if audio_frames is None else [int(f) for f in audio_frames]
        self.time_precision = time_precision
        self.options = options
        self.window = model.config.frames
        self.stride = model.config.frames // model.config.max_source_positions  # mel frames per encoder position
        self.timestamp_begin = config.extra.get("no_timestamps_token_id", model.config.vocab_size) + 1
        batch = features.shape[0]
        self.seek = [0] * batch
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.times: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.languages: list[int | None] = [None] * batch
        self.detected: list[int] | None = None
        self.max_length = config.max_length

    def run(self) -> list[Transcript]:
        while True:
            active = [r for r, seek in enumerate(self.seek) if seek < self.frames[r]]
            if not active:
                break
            self._decode_window(active)
        return [Transcript(tokens, torch.cat(times) if self.word_timestamps and times else
                           (torch.zeros(0) if self.word_timestamps else None), language)
                for tokens, times, language in zip(self.tokens, self.times, self.languages)]

    def _decode_window(self, active: list[int]) -> None:
        lengths = [min(self.frames[r] - self.seek[r], self.window) for r in active]
        hidden = self.model.encode(self._window_features(active, lengths))
        if self.detected is None and self.options["language"] is None and needs_language_detection(
                self.config, None, self.options["task"]):
            # Every audio is active on the first window: detect each one's language from its first 30 s.
            self.detected = detect_language(self.model, hidden, self.config)
        out = whisper_generate(
            self.model, hidden, self._window_config(), return_timestamps=self.timestamps,
            detected_language=None if self.detected is None else [self.detected[r] for r in active], **self.options)
        self._grow_max_length(out.prompt_length)
        times = self._token_times(out, active) if self.word_timestamps else None
        for i, r in enumerate(active):
            if self.seek[r] == 0:
                self.languages[r] = _language_of(out.sequences[i, :out.prompt_length].tolist(), self.config)
            tokens = _without_end(out.generated[i].tolist(), self.config)
            keep, advance = split_window(tokens, self.timestamp_begin, lengths[i], self.stride)
            self.tokens[r] += tokens[:keep]
            if times is not None:
                offset = torch.tensor(self.seek[r], dtype=torch.float64) * self.time_precision / self.stride
                self.times[r].append(times[i, :keep] + offset)  # float32, as the reference adds it
            # A window that ends inside its first segment at <|0.00|> would start again where it stood (and
            # decode the same tokens forever): it moves on past its end instead.
            self.seek[r] += advance if advance > 0 else lengths[i]

    def _window_features(self, active: list[int], lengths: list[int]) -> torch.Tensor:
        """(len(active), n_mels, window): each audio's features from its seek point, zero-padded to a window."""
        parts = []
        for r, length in zip(active, lengths):
            part = self.features[r, :, self.seek[r]: self.seek[r] + length]
            parts.append(F.pad(part, (0, self.window - part.shape[-1])) if part.shape[-1] < self.window else part)
        return torch.stack(parts)

    def _window_config(self) -> GenerationConfig:
        if self.config.max_new_tokens is None and self.max_length is not None:
            return self.config.replace(max_length=self.max_length)
        return self.config

    def _grow_max_length(self, prompt_length: int) -> None:
        """transformers lengthens max_length by the prompt (up to half the context) on every window and keeps the
        longer value for the next one; the result is capped at the model's limit."""
        if self.config.max_new_tokens is None and self.max_length is not None:
            limit = self.model.config.max_target_positions
            self.max_length = min(self.max_length + min(limit // 2 - 1, prompt_length), limit)

    def _token_times(self, out: GenerationOutput, active: list[int]) -> torch.Tensor:
        """(rows, G) start of each generated token in seconds from its window's start; each row aligned alone, its
        cross-attention cut to its own tokens and to its real audio after the seek point."""
        from ..processing.whisper_text import token_timestamps

        prompt, width = out.prompt_length, out.generated.shape[1]
        times = torch.zeros(out.generated.shape, dtype=torch.float32)
        filter_width = getattr(self.model.config, "median_filter_width", 7)
        for i, (r, generated) in enumerate(zip(active, generated_lengths(out, self.config))):
            weights = out.cross_attentions[i: i + 1, :, : prompt + generated - 1]  # (1, heads, rows, S)
            frames = None if self.audio_frames is None else self.audio_frames[r] - self.seek[r]
            if frames is not None and frames // 2 == 0:
                frames = None  # no audio left to align with: the reference would fail; align with the window
            found = token_timestamps(weights.float().cpu(), num_input_ids=prompt, time_precision=self.time_precision,
                                     num_frames=frames, median_filter_width=filter_width)[0, prompt:]
            times[i, : len(found)] = found
            if len(found) < width:  # past the end: the row's last time (those are end tokens, dropped)
                times[i, len(found):] = found[-1] if len(found) else 0.0
        return times


def split_window(tokens: list[int], timestamp_begin: int, window_frames: int, stride: int) -> tuple[int, int]:
    """One window's tokens -> (how many to keep, how many mel frames to move on).

    Segments end at a pair of timestamps. Tokens ending in a lone timestamp (or holding no pair) are kept whole and
    the next window starts after this one (`window_frames`). Otherwise the tokens after the last pair belong to a
    segment the window cut off: they are dropped, and the next window starts at the pair's time (`stride` mel
    frames per timestamp step)."""
    is_stamp = [t >= timestamp_begin for t in tokens]
    pair_ends = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    lone_stamp_ending = is_stamp[-2:] == [False, True]
    if not pair_ends or lone_stamp_ending:
        return len(tokens), window_frames
    last_pair = pair_ends[-1] - 1  # index of the pair's first timestamp
    return pair_ends[-1] + 1, (tokens[last_pair] - timestamp_begin) * stride


def generated_lengths(out: GenerationOutput, config: GenerationConfig) -> list[int]:
    """Generated tokens of each row, its end token included (what transformers aligns for that row alone)."""
    if out.beam_indices is not None:
        return (out.beam_indices != -1).sum(dim=-1).tolist()
    ends = torch.zeros_like(out.generated, dtype=torch.bool)
    for eos in config.eos_token_ids:
        ends |= out.generated == eos
    lengths = []
    for row in ends:
        hits = row.nonzero()
        lengths.append(int(hits[0]) + 1 if len(hits) else out.generated.shape[1])
    return lengths


def _without_end(tokens: list[int], config: GenerationConfig) -> list[int]:
    """A row's generated tokens without the padding after its end and without the end-of-text token, as
    transformers strips them (it counts every pad token of the row, and keeps one when pad is end of text)."""
    pad, eos = config.pad_token_id, config.eos_token_ids
    if tokens and pad is not None and tokens[-1] == pad:
        count = tokens.count(pad) - (1 if pad in eos else 0)
        if count > 0:
            tokens = tokens[:-count]
    if tokens and tokens[-1] in eos[:1]:
        tokens = tokens[:-1]
    return tokens


def _language_of(prompt: list[int], config: GenerationConfig) -> int | None:
    languages = set((config.extra.get("lang_to_id") or {}).values())
    return next((t for t in prompt if t in languages), None)
