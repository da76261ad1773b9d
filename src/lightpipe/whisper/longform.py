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

Options of openai's long-form decoding, as transformers names them (`LongFormOptions`):
- temperature as a list (e.g. (0.0, 0.2, 0.4, ...)) with compression_ratio_threshold and/or logprob_threshold:
  a window whose tokens compress too well (repetition loops) or whose mean log-probability is too low is decoded
  again at the next temperature (sampling), keeping the last attempt;
- condition_on_prev_tokens: each window's prompt holds the text kept so far (its last 223 tokens for a 448-token
  model) after <|startofprev|>, as long as the window before was decoded at a temperature below 0.5;
- prompt_condition_type: "first-segment" (prompt_ids prompt the first window only, then the kept text) or
  "all-segments" (prompt_ids stay in front of the kept text);
- no_speech_threshold (with logprob_threshold): a window whose mean log-probability is under logprob_threshold
  and whose probability of <|nospeech|> after <|startoftranscript|> is above no_speech_threshold is skipped as
  silence (nothing kept, the next window starts after it).
- max_ngram_repeats (lightpipe's own): a hard stop on runaway repetition (guards.py). A window whose text repeats
  one run of tokens more than that many times in a row (or, with compression_ratio_threshold, whose text becomes more
  compressible than that once 32 tokens long) ends there and counts as a failed attempt: decoded again at
  the next temperature; skipped as silence when its no-speech probability is above no_speech_threshold (a model
  looping over audio it finds silent is hallucinating, whatever its log-probability); at the last temperature kept
  with the extra copies cut off.

These options apply to every window the loop decodes, so to short audio (one window) as much as to long audio, and
to each chunk of a chunked one.

Each audio is decoded as transformers decodes it alone (batch_size=1): its own frame count bounds the loop and
its windows are its own features, cut and zero-padded to 30 s. Audios decoded together only share the forward
passes, so batching never changes a result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInput
from ..generation.generate import GenerationConfig, GenerationOutput
from .alignment import TIME_PRECISION, token_timestamps
from .guards import check_max_ngram_repeats, compression_ratio, cut_repetition
from .decoding import detect_language, needs_language_detection, tokens_of, whisper_generate
from .tokens import WhisperTokens


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


LANGUAGE_CONDITION_TYPES = ("first-segment", "all-segments")


@dataclasses.dataclass(frozen=True)
class LongFormOptions:
    """Options of openai's long-form decoding (see the module docstring); defaults do nothing."""

    temperatures: tuple[float | None, ...] = (None,)
    condition_on_prev_tokens: bool = False
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    prompt_condition_type: str = "first-segment"
    max_ngram_repeats: int | None = None

    @classmethod
    def build(cls, generation_config: GenerationConfig, temperature=None, condition_on_prev_tokens=None,
              compression_ratio_threshold=None, logprob_threshold=None, prompt_condition_type=None,
              no_speech_threshold=None, max_ngram_repeats=None) -> "LongFormOptions":
        """The call's options, else the checkpoint's generation config's, validated."""
        extra = generation_config.extra

        def pick(value, name):
            return value if value is not None else extra.get(name)

        temperatures = temperature if isinstance(temperature, (list, tuple)) else (temperature,)
        if not temperatures or not all(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)
                                                     and math.isfinite(t) and t >= 0) for t in temperatures):
            raise InvalidInput(f"temperature must be a non-negative number or a list of them (a fallback sequence), "
                               f"not {temperature!r}.")
        condition = pick(condition_on_prev_tokens, "condition_on_prev_tokens")
        if condition is not None and not isinstance(condition, bool):
            raise InvalidInput(f"condition_on_prev_tokens must be True or False, not {condition!r}.")
        thresholds = {}
        for name, value in (("compression_ratio_threshold", compression_ratio_threshold),
                            ("logprob_threshold", logprob_threshold), ("no_speech_threshold", no_speech_threshold)):
            value = pick(value, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise InvalidInput(f"{name} must be a number, not {value!r}.")
            thresholds[name] = None if value is None else float(value)
        kind = prompt_condition_type if prompt_condition_type is not None else "first-segment"
        if kind not in LANGUAGE_CONDITION_TYPES:
            raise InvalidInput(f"prompt_condition_type must be one of {', '.join(LANGUAGE_CONDITION_TYPES)}, "
                               f"not {kind!r}.")
        if thresholds["no_speech_threshold"] is not None and thresholds["logprob_threshold"] is None:
            raise InvalidInput("no_speech_threshold needs logprob_threshold: a window is skipped as silence when its "
                               "no-speech probability is above the one and its mean log-probability below the other.")
        if kind == "all-segments" and condition is not True:
            raise InvalidInput("prompt_condition_type='all-segments' needs condition_on_prev_tokens=True.")
        return cls(tuple(None if t is None else float(t) for t in temperatures), bool(condition), **thresholds,
                   prompt_condition_type=kind,
                   max_ngram_repeats=check_max_ngram_repeats(pick(max_ngram_repeats, "max_ngram_repeats")))


def transcribe(model, features: torch.Tensor, frames: Sequence[int], generation_config: GenerationConfig, *,
               timestamps: bool = False, alignment_heads: Sequence[Sequence[int]] | None = None,
               audio_frames: Sequence[int] | None = None, time_precision: float = TIME_PRECISION, language=None,
               task: str | None = None, prompt_ids: Sequence[int] | None = None,
               long_form: LongFormOptions | None = None, tokens: WhisperTokens | None = None,
               on_window: Callable[[int], None] | None = None) -> list[Transcript]:
    """Decode each audio of `features` (B, n_mels, width) window by window.

    frames: each audio's own feature frames (at most `width`): the loop ends when its windows cover them.
    timestamps: decode with timestamp tokens (always done for audio longer than one window).
    alignment_heads: (layer, head) pairs of the decoder's cross-attention that follow the audio: with them, each
        token is also aligned with the audio (word timestamps, alignment.py); audio_frames, the frames of real
        audio in each item (its attention mask), cut the alignment to the audio as transformers' num_frames does.
    time_precision: seconds per timestamp step (30 s / 1500 encoder positions).
    language, task, prompt_ids: as `whisper_generate`; a language that must be detected is detected once per audio,
        on its first window, and kept for the others.
    long_form: temperature fallback and conditioning on previous text (`LongFormOptions`).
    tokens: the checkpoint's special tokens (else those generation_config names).
    on_window: called after each window with the number of mel frames the audios advanced by (their sum over a
        call is sum(frames)): a progress bar for long audio, which is one pipeline item however long it is.
    """
    batch = features.shape[0]
    if len(frames) != batch or (audio_frames is not None and len(audio_frames) != batch):
        raise InvalidInput(f"frames and audio_frames must hold one count per audio ({batch}).")
    window = model.config.frames
    with_timestamps = [bool(timestamps) or int(f) > window for f in frames]
    options = dict(alignment_heads=alignment_heads, time_precision=time_precision, language=language, task=task,
                   prompt_ids=prompt_ids, long_form=long_form, tokens=tokens_of(generation_config, tokens),
                   on_window=on_window)
    if len(set(with_timestamps)) > 1:  # different prompts and rules: decode the two kinds apart
        results: list[Transcript | None] = [None] * batch
        for kind in (False, True):
            rows = [r for r in range(batch) if with_timestamps[r] == kind]
            part = transcribe(model, features[rows], [frames[r] for r in rows], generation_config, timestamps=kind,
                              audio_frames=None if audio_frames is None else [audio_frames[r] for r in rows],
                              **options)
            for r, transcript in zip(rows, part):
                results[r] = transcript
        return results  # type: ignore[return-value]
    return _SeekLoop(model, features, frames, generation_config, with_timestamps[0], audio_frames, **options).run()


class _SeekLoop:
    """The state of one batch of audios decoded window by window: where each one stands (`seek`, in mel frames),
    the segments it kept, whether its next prompt holds them, and its decoding length limit, which grows window
    after window as transformers lets it. Audios decode together when their prompts have one length and their
    limits agree; otherwise in groups, so that each one decodes exactly as it would alone."""

    def __init__(self, model, features, frames, config, timestamps, audio_frames, *, alignment_heads,
                 time_precision, language, task, prompt_ids, long_form, tokens, on_window=None):
        self.model, self.features, self.config, self.tokens = model, features, config, tokens
        self.on_window = on_window
        self.frames = [int(f) for f in frames]
        self.timestamps = timestamps
        self.alignment_heads = None if alignment_heads is None else [tuple(pair) for pair in alignment_heads]
        self.word_timestamps = self.alignment_heads is not None
        self.audio_frames = None if audio_frames is None else [int(f) for f in audio_frames]
        self.time_precision = time_precision
        self.language, self.task = language, task
        self.long_form = long_form or LongFormOptions()
        self.window = model.config.frames
        self.stride = model.config.frames // model.config.max_source_positions  # mel frames per encoder position
        self.timestamp_begin = tokens.timestamp_begin
        self.start_of_previous = tokens.sot_prev
        self.prompt_ids = None if prompt_ids is None else [int(t) for t in prompt_ids]
        batch = features.shape[0]
        self.seek = [0] * batch
        self.segments: list[list[list[int]]] = [[] for _ in range(batch)]
        if self.prompt_ids is not None and self.long_form.prompt_condition_type == "first-segment":
            # transformers files the prompt as the audio's first segment (its <|startofprev|> left out): with
            # conditioning, later windows see it as previous text; it is never part of the result.
            ids = self.prompt_ids[1:] if self.prompt_ids[:1] == [self.start_of_previous] else self.prompt_ids
            self.segments = [[ids] for _ in range(batch)]
        self.first_kept = [len(s) for s in self.segments]
        self.times: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.languages: list[int | None] = [None] * batch
        self.detected: list[int] | None = None
        self.condition = [self.long_form.condition_on_prev_tokens] * batch
        self.max_length = [config.max_length] * batch

    def run(self) -> list[Transcript]:
        while True:
            active = [r for r, seek in enumerate(self.seek) if seek < self.frames[r]]
            if not active:
                break
            done = self._frames_done()
            self._decode_window(active)
            if self.on_window is not None:
                self.on_window(self._frames_done() - done)
        transcripts = []
        for r in range(len(self.seek)):
            tokens = [t for segment in self.segments[r][self.first_kept[r]:] for t in segment]
            times = None
            if self.word_timestamps:
                times = torch.cat(self.times[r]) if self.times[r] else torch.zeros(0)
            transcripts.append(Transcript(tokens, times, self.languages[r]))
        return transcripts

    def _frames_done(self) -> int:
        return sum(min(seek, frames) for seek, frames in zip(self.seek, self.frames))

    # ------------------------------------------------------------------ one window of each active audio
    def _decode_window(self, active: list[int]) -> None:
        lengths = dict(zip(active, (min(self.frames[r] - self.seek[r], self.window) for r in active)))
        hidden = self.model.encode(self._window_features(active, lengths))
        if self.detected is None and self.language is None and needs_language_detection(
                self.config, None, self.task, tokens=self.tokens):
            # Every audio is active on the first window: detect each one's language from its first 30 s.
            self.detected = detect_language(self.model, hidden, self.config, tokens=self.tokens)
        position = {r: i for i, r in enumerate(active)}
        prompts = {r: self._previous_text(r) for r in active}
        groups: dict[tuple, list[int]] = {}
        for r in active:
            key = (None if prompts[r] is None else len(prompts[r]), self.max_length[r])
            groups.setdefault(key, []).append(r)
        for rows in groups.values():
            group_hidden = hidden if len(rows) == len(active) else hidden[[position[r] for r in rows]]
            self._decode_with_fallback(rows, group_hidden, prompts, lengths)

    def _decode_with_fallback(self, rows: list[int], hidden: torch.Tensor, prompts: dict, lengths: dict) -> None:
        """Decode the rows' windows at the first temperature; rows whose result fails the thresholds are decoded
        again at the next one, and the last attempt stands."""
        temperatures = self.long_form.temperatures
        config = self._window_config(self.max_length[rows[0]])
        pending, index_of = rows, {r: i for i, r in enumerate(rows)}
        for attempt, temperature in enumerate(temperatures):
            picked = [index_of[r] for r in pending]
            decoded = whisper_generate(
                self.model, hidden[picked], config, language=self.language, task=self.task,
                return_timestamps=self.timestamps,
                prompt_ids=None if prompts[rows[0]] is None else [prompts[r] for r in pending],
                temperature=temperature,
                detected_language=None if self.detected is None else [self.detected[r] for r in pending],
                tokens=self.tokens, alignment_heads=self.alignment_heads,
                max_ngram_repeats=self.long_form.max_ngram_repeats,
                compression_stop=self.long_form.compression_ratio_threshold)
            # With alignment heads, the cross-attention weights come along (for word times).
            out, weights = decoded if self.word_timestamps else (decoded, None)
            last = attempt == len(temperatures) - 1
            silence = self._no_speech_probs(out, hidden[picked])
            retry = []
            for i, r in enumerate(pending):
                tokens = _without_padding(out.generated[i].tolist(), self.config)
                no_speech = None if silence is None else silence[i]
                cut = self._repetition_cut(tokens, lengths[r])
                verdict = self._verdict(tokens, out, i, temperature, no_speech)
                if cut is not None:  # a runaway repetition: a failed attempt, or silence the model looped over
                    verdict = "silence" if no_speech is not None and no_speech > self.long_form.no_speech_threshold \
                        else "retry"
                if verdict == "retry" and not last:
                    retry.append(r)
                elif verdict == "silence":
                    self._skip(r, out, i, lengths[r], temperature)
                else:
                    self._keep(r, out, weights, i, tokens if cut is None else cut, lengths[r], temperature)
            if not retry:
                break
            pending = retry
        for r in rows:
            self.max_length[r] = self._grown_max_length(self.max_length[r], out.prompt_length)

    def _skip(self, r: int, out: GenerationOutput, i: int, length: int, temperature) -> None:
        """A window judged silent: nothing kept, the next window starts after it."""
        if self.seek[r] == 0:
            self.languages[r] = _language_of(out.sequences[i, :out.prompt_length].tolist(), self.tokens)
        self.condition[r] = self.long_form.condition_on_prev_tokens and (temperature is None or temperature < 0.5)
        self.seek[r] += length

    def _keep(self, r: int, out: GenerationOutput, weights: torch.Tensor | None, i: int, tokens: list[int], length: int,
              temperature) -> None:
        if self.seek[r] == 0:
            self.languages[r] = _language_of(out.sequences[i, :out.prompt_length].tolist(), self.tokens)
        if tokens and tokens[-1] in self.config.eos_token_ids[:1]:
            tokens = tokens[:-1]
        segments, advance = split_window(tokens, self.timestamp_begin, length, self.stride)
        self.segments[r] += segments
        if self.word_timestamps:
            times = self._token_times(out, weights, i, r)
            offset = torch.tensor(self.seek[r], dtype=torch.float64) * self.time_precision / self.stride
            self.times[r].append(times[: sum(map(len, segments))] + offset)  # float32, as the reference adds it
        self.condition[r] = self.long_form.condition_on_prev_tokens and (temperature is None or temperature < 0.5)
        # A window that ends inside its first segment at <|0.00|> would start again where it stood (and decode
        # the same tokens forever): it moves on past its end instead.
        self.seek[r] += advance if advance > 0 else length

    def _repetition_cut(self, tokens: list[int], length: int) -> list[int] | None:
        """With max_ngram_repeats, the window's tokens with the copies past it cut off when the repetition stop ended
        them (None otherwise)."""
        repeats = self.long_form.max_ngram_repeats
        if repeats is None or not tokens or tokens[-1] not in self.config.eos_token_ids:
            return None
        end_step = min(length // self.stride, self.model.config.max_source_positions)
        return cut_repetition(tokens[:-1], repeats, self.tokens.eot, self.timestamp_begin, self.timestamps, end_step,
                              self.long_form.compression_ratio_threshold, self.model.config.vocab_size)

    # ------------------------------------------------------------------ prompts, limits, fallback
    def _previous_text(self, r: int) -> list[int] | None:
        """The prompt_ids of an audio's next window: with conditioning, the text kept so far (each segment that
        ends in a timestamp pair without its last timestamp), its last max_target_positions // 2 - 1 tokens, after
        <|startofprev|> (or after prompt_ids with prompt_condition_type="all-segments"); else the call's prompt_ids."""
        if not (self.condition[r] and self.segments[r]):
            return self.prompt_ids
        kept = []
        for segment in self.segments[r]:
            ends_in_pair = len(segment) > 2 and segment[-2] >= self.timestamp_begin
            kept += segment[:-1] if ends_in_pair else segment
        kept = kept[-(self.model.config.max_target_positions // 2 - 1):]
        if self.long_form.prompt_condition_type == "all-segments" and self.prompt_ids is not None:
            return self.prompt_ids + kept
        if self.start_of_previous is None:
            raise InvalidInput("condition_on_prev_tokens needs prev_sot_token_id (<|startofprev|>) in the checkpoint's "
                               "generation_config.json.")
        return [self.start_of_previous] + kept

    def _verdict(self, tokens: list[int], out: GenerationOutput, i: int, temperature, no_speech: float | None) -> str:
        """transformers' judgement of one attempt (its tokens with the end-of-text token): "retry" when too
        compressible or under the mean log-probability threshold, "silence" when moreover (log-probability too low)
        the no-speech probability is above its threshold, else "keep"."""
        options = self.long_form
        retry = False
        if options.compression_ratio_threshold is not None:
            retry = compression_ratio(tokens, self.model.config.vocab_size) > options.compression_ratio_threshold
        if options.logprob_threshold is not None:
            low = mean_logprob(out, i, tokens, temperature) < options.logprob_threshold
            retry = retry or low
            if no_speech is not None and low and no_speech > options.no_speech_threshold:
                return "silence"
        return "retry" if retry else "keep"

    def _no_speech_probs(self, out: GenerationOutput, hidden: torch.Tensor) -> list[float] | None:
        """Per row, the probability of <|nospeech|> right after <|startoftranscript|> (what openai's and
        transformers' no-speech detection reads), when no_speech_threshold is set."""
        if self.long_form.no_speech_threshold is None:
            return None
        prompt = out.sequences[:, : out.prompt_length]
        start = prompt[0].tolist().index(self.tokens.sot) + 1
        with torch.inference_mode():
            cache = self.model.new_cache(prompt.shape[0], start, encoder_hidden=hidden)
            logits = self.model.decode_step(prompt[:, :start], cache, last_only=True)[:, -1]
        return logits.float().softmax(dim=-1)[:, self.tokens.no_speech].tolist()

    def _window_config(self, max_length: int | None) -> GenerationConfig:
        changes = {}
        if self.long_form.logprob_threshold is not None:
            changes["output_scores"] = True
        if self.config.max_new_tokens is None and max_length is not None:
            changes["max_length"] = max_length
        return self.config.replace(**changes) if changes else self.config

    def _grown_max_length(self, max_length: int | None, prompt_length: int) -> int | None:
        """transformers lengthens max_length by the prompt (up to half the context) on every window and keeps the
        longer value for the next one; the result is capped at the model's limit."""
        if self.config.max_new_tokens is None and max_length is not None:
            limit = self.model.config.max_target_positions
            return min(max_length + min(limit // 2 - 1, prompt_length), limit)
        return max_length

    # ------------------------------------------------------------------ features and word times
    def _window_features(self, active: list[int], lengths: dict[int, int]) -> torch.Tensor:
        """(len(active), n_mels, window): each audio's features from its seek point, zero-padded to a window."""
        parts = []
        for r in active:
            part = self.features[r, :, self.seek[r]: self.seek[r] + lengths[r]]
            parts.append(F.pad(part, (0, self.window - part.shape[-1])) if part.shape[-1] < self.window else part)
        return torch.stack(parts)

    def _token_times(self, out: GenerationOutput, weights: torch.Tensor, i: int, r: int) -> torch.Tensor:
        """(G,) start of each generated token of row i in seconds from its window's start; the row aligned alone,
        its cross-attention `weights` (rows, heads, T - 1, S) cut to its own tokens and to its real audio after
        the seek point.

        The audio left after the seek point is passed as a per-row count, as transformers passes it, so that the
        cut is the reference's (see `token_timestamps`). When the loop decodes a window again past the end of a
        short clip (the clip padded to 30 s ended inside a segment), that count is negative: the alignment then
        keeps fewer frames, or none, which puts every token one step before the window's start (e.g. 29.96 s for
        a window at 29.98 s) instead of somewhere beyond the audio."""
        prompt, width = out.prompt_length, out.generated.shape[1]
        generated = generated_lengths(out, self.config)[i]
        row = weights[i: i + 1, :, : prompt + generated - 1]  # (1, heads, rows, S)
        frames = None if self.audio_frames is None else [self.audio_frames[r] - self.seek[r]]
        found = token_timestamps(row.float().cpu(), num_input_ids=prompt, time_precision=self.time_precision,
                                 num_frames=frames,
                                 median_filter_width=getattr(self.model.config, "median_filter_width", 7))[0, prompt:]
        times = torch.zeros(width, dtype=torch.float32)
        times[: len(found)] = found
        if len(found) < width:  # past the end: the row's last time (those are end tokens, dropped)
            times[len(found):] = found[-1] if len(found) else 0.0
        return times


def split_window(tokens: list[int], timestamp_begin: int, window_frames: int,
                 stride: int) -> tuple[list[list[int]], int]:
    """One window's tokens -> (its segments, how many mel frames to move on).

    A segment ends where a timestamp pair starts. Tokens ending in a lone timestamp (or holding no pair) are kept
    whole and the next window starts after this one (`window_frames`). Otherwise the tokens after the last pair
    belong to a segment the window cut off: they are dropped (the last kept segment ends with the whole pair), and
    the next window starts at the pair's first time (`stride` mel frames per timestamp step)."""
    is_stamp = [t >= timestamp_begin for t in tokens]
    pair_ends = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    if not pair_ends:
        return [tokens], window_frames
    lone_stamp_ending = is_stamp[-2:] == [False, True]
    cuts = pair_ends + [len(tokens)] if lone_stamp_ending else pair_ends[:-1] + [pair_ends[-1] + 1]
    segments = [tokens[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
    if lone_stamp_ending:
        return segments, window_frames
    return segments, (tokens[pair_ends[-1] - 1] - timestamp_begin) * stride


def mean_logprob(out: GenerationOutput, i: int, tokens: list[int], temperature) -> float:
    """The mean log-probability of row i's tokens (end of text included) under the scores that chose them, the
    sampling temperature undone, as transformers computes it (beam search: the scores of the beam each token came
    from)."""
    steps = out.scores
    if out.beam_indices is not None:
        beams = out.beam_indices[i].tolist()[: len(steps)]
        scores = torch.stack([step[beam] for step, beam in zip(steps, beams)])
    else:
        scores = torch.stack([step[i] for step in steps])
    ids = torch.tensor(tokens, dtype=torch.long)
    if scores.shape[0] > ids.shape[0]:
        scores = scores[: ids.shape[0]]
    else:
        ids = ids[ids.shape[0] - scores.shape[0]:]
    rescale = temperature if temperature is not None and temperature > 0 else 1
    logprobs = torch.log_softmax((scores * rescale).float(), dim=-1)
    picked = logprobs.gather(-1, ids[:, None]).squeeze(-1).cpu()
    return float(sum(picked[k] for k in range(picked.shape[0])) / len(ids))


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


def _without_padding(tokens: list[int], config: GenerationConfig) -> list[int]:
    """A row's generated tokens without the padding after its end, as transformers strips it (it counts every pad
    token of the row, and keeps one when pad is end of text: the end token counts in the mean log-probability)."""
    pad, eos = config.pad_token_id, config.eos_token_ids
    if tokens and pad is not None and tokens[-1] == pad:
        count = tokens.count(pad) - (1 if pad in eos else 0)
        if count > 0:
            tokens = tokens[:-count]
    return tokens


def _language_of(prompt: list[int], tokens: WhisperTokens) -> int | None:
    languages = {i for _, i in tokens.language_ids}
    return next((t for t in prompt if t in languages), None)
