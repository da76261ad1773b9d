"""automatic-speech-recognition: audio -> {"text": ...}, as transformers' pipeline gives it.

One pipeline, with the decoding picked by the loaded model's head:

- "ctc" (Wav2Vec2ForCTC, HubertForCTC): `CTCDecoding`. The model gives a character distribution per
  feature frame (one frame per `inputs_to_logits_ratio` samples: 320 = 20 ms at 16 kHz); decoding is
  greedy: the best id per frame, repeats collapsed, the blank (pad) token dropped, the word delimiter
  "|" read as a space. Character or word timestamps come from the frames each one spans.
- "speech-seq2seq" (Whisper): `WhisperDecoding`. Each item (a chunk, or a whole input of any length) is decoded
  by Whisper's window loop (`lightpipe.whisper.longform.transcribe`: 30 s windows, each encoded once and decoded
  by `whisper_generate`, the next starting where the text stopped; beam search with 5 beams and at most 256 new
  tokens unless the checkpoint's generation config or the call says otherwise, as transformers' pipeline); the
  items' tokens are merged into one text, and timestamps, by `decode_asr`. Word timestamps come from the
  alignment heads' cross-attention by DTW (`lightpipe.whisper.alignment`).

What every model shares, in this file and model-independent:

1. Input normalisation (`FeatureExtractor.load`): a path, URL, bytes, array, tensor or
   {"raw"/"array", "sampling_rate", "stride"?, ...} dict -> float32 mono samples at the feature
   extractor's rate, the dict's stride (rescaled to that rate) and its other keys ("extra").
2. Chunking (`chunk_length_s`, `stride_length_s`): long audio is cut into windows of `chunk_length_s`
   that overlap by `stride_length_s` on each side (default chunk_length_s / 6), all sizes rounded to
   whole model frames (`align_to` samples), exactly as transformers' `chunk_iter`. Each window is one
   model item whose meta carries its stride (see `WindowMeta`); the runtime batches windows across
   inputs (`batch_size`) and hands all windows of one input, in order, to postprocess.
3. Output: {"text": str}, plus "chunks": [{"text", "timestamp": (start_s, end_s)}] with
   `return_timestamps`, plus the dict input's extra keys as lists (one entry per window), as
   transformers returns them.
4. Voice activity detection (`vad_filter`, `vad_parameters`): instead of 2., the input's speech regions
   (`lightpipe.vad`) are packed into windows of at most 30 s (`lightpipe.processing.regions`), each one
   model item decoded alone; postprocess maps every time back through the window's pieces
   (`WindowMeta.timeline`). An input without speech is one empty item that is never decoded.

Batching never changes a result: each window's outputs are cut to its own length before decoding.
"""

from __future__ import annotations

import dataclasses
import numbers
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch

from .. import models
from ..errors import CheckpointError, InvalidInput, UnsupportedModel
from ..processing.text import _read_json, _token_content, clean_up_tokenization
from ..runtime import ModelItem, Padding
from .base import Pipeline

CTC_TIMESTAMPS = ("char", "word")
STRIDE_FRACTION = 6  # default stride on each side: chunk_length_s / 6, as transformers


class WindowMeta(TypedDict):
    """The meta of one model item (one window of one input), the same for every decoding.

    samples: the window's length in samples at the feature extractor's sampling rate.
    stride: None, or (samples, left, right): the window's length and how many of its first and last
        samples only give context (they overlap the neighbouring windows, or a dict input's "stride"
        asked to ignore them); samples at the feature extractor's rate, as transformers' `chunk_iter`.
    start: the window's first sample in the whole input (same rate).
    extra: the dict input's other keys, returned with the result.
    timeline: with vad_filter, the window's pieces of the input (`PackedWindow`: speech regions back to back), by
        which its times map back to the input's; a window without pieces stands for an input without speech.
        None without vad_filter.
    """

    samples: int
    stride: tuple[int, int, int] | None
    start: int
    extra: dict[str, Any]
    timeline: Any


# ---------------------------------------------------------------------------------------------- chunking
def window_sizes(chunk_length_s: float, stride_length_s, sampling_rate: int, align_to: int) -> tuple[int, int, int]:
    """(chunk, left stride, right stride) in samples, each rounded to a multiple of `align_to` samples
    (the model's samples per output frame) so that strides drop whole frames."""
    if stride_length_s is None:
        stride_length_s = chunk_length_s / STRIDE_FRACTION
    if isinstance(stride_length_s, numbers.Real):
        stride_length_s = (stride_length_s, stride_length_s)

    def aligned(seconds: float) -> int:
        return int(round(seconds * sampling_rate / align_to) * align_to)

    chunk, left, right = aligned(chunk_length_s), aligned(stride_length_s[0]), aligned(stride_length_s[1])
    if chunk <= left + right:
        raise InvalidInput(
            f"chunk_length_s={chunk_length_s} gives windows of {chunk} samples, not longer than the strides "
            f"({left} + {right} samples): make chunk_length_s longer than twice stride_length_s."
        )
    return chunk, left, right


def chunk_windows(n: int, chunk: int, left: int, right: int) -> list[tuple[int, int, tuple[int, int, int]]]:
    """Windows over `n` samples: (start, end, (length, left stride, right stride)) each, in order.

    transformers' `chunk_iter`: windows start every `chunk - left - right` samples; the first has no
    left stride and the last (the first reaching the end) no right stride."""
    step = chunk - left - right
    windows = []
    for start in range(0, n, step):
        end = min(start + chunk, n)
        is_last = start + chunk >= n
        stride = (end - start, 0 if start == 0 else left, 0 if is_last else right)
        if end - start > stride[1]:
            windows.append((start, end, stride))
        if is_last:
            break
    return windows


def rescale_stride(stride: tuple[int, int, int], ratio: float) -> tuple[int, int, int]:
    """(samples, left, right) in samples -> in output frames at `ratio` frames per sample, rounded as
    transformers rounds them (the frame count first, then each side in proportion)."""
    samples, left, right = stride
    frames = int(round(samples * ratio))
    return frames, int(round(left / samples * frames)), int(round(right / samples * frames))


# ---------------------------------------------------------------------------------------------- CTC
class CTCVocabulary:
    """The character vocabulary of a CTC checkpoint (Wav2Vec2CTCTokenizer: vocab.json +
    tokenizer_config.json) and its decoding rules: ids -> text, with character offsets in frames."""

    def __init__(self, tokens: dict[int, str], *, pad_token: str = "<pad>", unk_token: str = "<unk>",
                 word_delimiter_token: str | None = "|", replace_word_delimiter_char: str = " ",
                 do_lower_case: bool = False, clean_up_tokenization_spaces: bool = False):
        self.tokens = tokens
        self.pad_token = pad_token  # the CTC blank
        self.unk_token = unk_token
        self.word_delimiter_token = word_delimiter_token
        self.replace_word_delimiter_char = replace_word_delimiter_char
        self.do_lower_case = do_lower_case
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CTCVocabulary":
        folder = Path(folder)
        vocab_path = folder / "vocab.json"
        if not vocab_path.is_file():
            raise CheckpointError(
                f"{folder} has no vocab.json: a CTC speech checkpoint needs its character vocabulary "
                "(vocab.json and tokenizer_config.json, as Wav2Vec2CTCTokenizer saves them)."
            )
        vocab = _read_json(vocab_path)
        config = _read_json(folder / "tokenizer_config.json")
        special = {**_read_json(folder / "special_tokens_map.json"), **config}  # tokenizer_config.json wins
        target_lang = config.get("target_lang")
        if target_lang:
            if not isinstance(vocab.get(target_lang), dict):
                raise CheckpointError(f"{vocab_path} has no vocabulary for target_lang {target_lang!r}.")
            vocab = vocab[target_lang]  # multilingual (MMS) vocabularies nest one per language
        if not vocab or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
            raise CheckpointError(
                f"{vocab_path} must map each token to an integer id (a multilingual vocabulary nested by language "
                "needs target_lang in tokenizer_config.json)."
            )
        tokens = {i: t for t, i in vocab.items()}
        # Ids beyond vocab.json that tokenizer_config.json declares (added tokens) decode to their content.
        for index, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(entry)[0]
            if content is not None and str(index).lstrip("-").isdigit() and int(index) not in tokens:
                tokens[int(index)] = content
        delimiter = _token_content(special.get("word_delimiter_token", "|"))[0]
        replace = config.get("replace_word_delimiter_char", " ")
        return cls(
            tokens,
            pad_token=_token_content(special.get("pad_token"))[0] or "<pad>",
            unk_token=_token_content(special.get("unk_token"))[0] or "<unk>",
            word_delimiter_token=delimiter,
            replace_word_delimiter_char=replace if isinstance(replace, str) else " ",
            do_lower_case=bool(config.get("do_lower_case", False)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def decode(self, ids, with_offsets: bool = False) -> tuple[str, list[dict[str, Any]] | None]:
        """Frame ids (T,) -> (text, character offsets or None), as Wav2Vec2CTCTokenizer.decode with
        skip_special_tokens=False (the transformers pipeline's call): special tokens such as "</s>"
        stay in the text.

        Offsets: [{"char", "start_offset", "end_offset"}] in frames, end exclusive, one per emitted
        token (the delimiter as `replace_word_delimiter_char`), the blank dropped.
        """
        tokens = [self.tokens.get(int(i), self.unk_token) for i in ids]
        runs = [(token, len(list(group))) for token, group in groupby(tokens)]  # CTC: repeats collapse
        chars = [self.replace_word_delimiter_char if t == self.word_delimiter_token else t
                 for t, _ in runs if t != self.pad_token]
        text = "".join(chars).strip()
        if self.do_lower_case:
            text = text.lower()
        if self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        if not with_offsets:
            return text, None
        offsets, end = [], 0
        for token, count in runs:
            start, end = end, end + count
            if token != self.pad_token:
                offsets.append({"char": chars[len(offsets)], "start_offset": start, "end_offset": end})
        return text, offsets

    def word_offsets(self, char_offsets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Character offsets -> [{"word", "start_offset", "end_offset"}]: runs of characters between
        delimiters (transformers' `_get_word_offsets`)."""
        words: list[dict[str, Any]] = []
        for is_space, group in groupby(char_offsets, key=lambda o: o["char"] == self.replace_word_delimiter_char):
            if not is_space:
                group = list(group)
                words.append({"word": "".join(o["char"] for o in group), "start_offset": group[0]["start_offset"],
                              "end_offset": group[-1]["end_offset"]})
        return words


class CTCDecoding:
    """Greedy CTC over frame-wise logits, for Wav2Vec2ForCTC and HubertForCTC."""

    name = "ctc"
    max_window_seconds = 30.0  # vad_filter packs speech regions into windows of at most this

    def __init__(self, pipeline: "AutomaticSpeechRecognitionPipeline", vocabulary: CTCVocabulary):
        self.model = pipeline.model
        self.feature_extractor = pipeline.feature_extractor
        self.vocabulary = vocabulary
        self.align_to = int(self.model.config.inputs_to_logits_ratio)  # samples per output frame
        self.min_samples = 1
        while self.model.output_lengths(self.min_samples) < 1:  # the convolutions' receptive field
            self.min_samples += 1
        self.padding = Padding(values={"input_values": float(self.feature_extractor.padding_value), "attention_mask": 0})

    def check_params(self, params: dict[str, Any]) -> None:
        stamps = params.get("return_timestamps")
        if stamps not in (None, False) and stamps not in CTC_TIMESTAMPS:
            raise InvalidInput(f"CTC models give return_timestamps='char' or 'word', not {stamps!r}.")
        if params.get("return_language"):
            raise InvalidInput("return_language is for Whisper models only.")

    def features(self, audio: np.ndarray, whole: bool = False) -> dict[str, torch.Tensor]:
        # transformers' pipeline always asks for the mask: padded batches then mask padded frames.
        return self.feature_extractor(audio, return_attention_mask=True)

    def empty_features(self) -> dict[str, torch.Tensor]:
        """The features of an item without audio (vad_filter found no speech): no samples; decodes to nothing."""
        return {k: v[:0] for k, v in self.features(np.zeros(self.min_samples, dtype=np.float32)).items()}

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        """Generation settings (generate_kwargs, max_new_tokens) do not apply to CTC and are ignored, as in
        transformers; forward takes nothing but the batch."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = batch["input_values"].to(next(self.model.parameters()).dtype)
        if values.shape[1] == 0:  # items without speech only (vad_filter): nothing to run
            return {"tokens": torch.zeros(values.shape[0], 0, dtype=torch.long)}
        logits = self.model(values, batch.get("attention_mask"))["logits"]  # (B, T, vocab)
        return {"tokens": logits.argmax(dim=-1)}  # (B, T)

    def frame_ids(self, outputs: list[dict[str, torch.Tensor]], metas: list[WindowMeta]) -> np.ndarray:
        """The windows' best ids joined, each window cut to its own frames and its strides dropped."""
        pieces = []
        for out, meta in zip(outputs, metas):
            ids = out["tokens"][: int(self.model.output_lengths(meta["samples"]))].numpy()
            if meta["stride"] is not None:
                frames, left, right = rescale_stride(meta["stride"], 1 / self.align_to)
                ids = ids[left: frames - right]
            pieces.append(ids)
        return np.concatenate(pieces)

    def postprocess(self, outputs: list[dict[str, torch.Tensor]], metas: list[WindowMeta],
                    return_timestamps=None, **params) -> dict[str, Any]:
        if metas[0]["timeline"] is not None:
            return self._speech_windows(outputs, metas, return_timestamps)
        text, offsets = self.vocabulary.decode(self.frame_ids(outputs, metas), with_offsets=bool(return_timestamps))
        result: dict[str, Any] = {"text": text}
        if return_timestamps:
            result["chunks"] = self._chunks(offsets, return_timestamps, lambda s, is_end: s)
        return result

    def _chunks(self, offsets: list[dict[str, Any]], return_timestamps: str, seconds) -> list[dict[str, Any]]:
        """Character offsets (frames) -> [{"text": char or word, "timestamp": (start_s, end_s)}]; `seconds(s, is_end)`
        maps a time from the decoded audio's start to the input's."""
        key = "char"
        if return_timestamps == "word":
            offsets, key = self.vocabulary.word_offsets(offsets), "word"
        rate = self.feature_extractor.sampling_rate
        return [{"text": o[key], "timestamp": (seconds(o["start_offset"] * self.align_to / rate, False),
                                               seconds(o["end_offset"] * self.align_to / rate, True))}
                for o in offsets]

    def _speech_windows(self, outputs, metas: list[WindowMeta], return_timestamps) -> dict[str, Any]:
        """vad_filter: each window of speech regions decoded alone, its times mapped back through its pieces, the
        windows' texts joined by the word delimiter."""
        rate, space = self.feature_extractor.sampling_rate, self.vocabulary.replace_word_delimiter_char
        texts: list[str] = []
        chunks: list[dict[str, Any]] = []
        for out, meta in zip(outputs, metas):
            window = meta["timeline"]
            if not window.pieces:
                continue
            ids = out["tokens"][: int(self.model.output_lengths(meta["samples"]))].numpy()
            text, offsets = self.vocabulary.decode(ids, with_offsets=bool(return_timestamps))
            if not text:
                continue
            if return_timestamps:
                own = self._chunks(offsets, return_timestamps,
                                   lambda s, is_end, w=window: w.to_original(s, rate, is_end=is_end))
                if texts and return_timestamps == "char" and own:  # the delimiter between two windows' text
                    chunks.append({"text": space, "timestamp": (chunks[-1]["timestamp"][1], own[0]["timestamp"][0])})
                chunks += own
            texts.append(text)
        result: dict[str, Any] = {"text": space.join(texts)}
        if return_timestamps:
            result["chunks"] = chunks
        return result


# ---------------------------------------------------------------------------------------------- seq2seq
WHISPER_TIMESTAMPS = (True, "word")
# What the ASR pipeline decodes with when the checkpoint's generation config leaves these unset (transformers'
# pipeline defaults, after openai/whisper's beam size).
PIPELINE_NUM_BEAMS = 5
PIPELINE_MAX_NEW_TOKENS = 256
REFERENCE_MAX_LENGTH = 20  # transformers' default max_length: a config that keeps it has "not set" it
# generate_kwargs that are Whisper prompt options (passed to whisper_generate), not GenerationConfig fields.
WHISPER_OPTIONS = ("language", "task", "prompt_ids")
# generate_kwargs of openai's long-form decoding (temperature fallback, conditioning on previous text).
LONG_FORM_OPTIONS = ("temperature", "condition_on_prev_tokens", "compression_ratio_threshold", "logprob_threshold",
                     "no_speech_threshold", "prompt_condition_type", "max_ngram_repeats")
# The recommended settings for real recordings (the command line's --robust, on by default): voice activity detection,
# and the hallucination guards of openai's decoding with lightpipe's repetition stop.
ROBUST_GENERATE_KWARGS = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 1.35,
                          "logprob_threshold": -1.0, "no_speech_threshold": 0.6, "max_ngram_repeats": 4}
ROBUST_PARAMS = {"vad_filter": True, "generate_kwargs": ROBUST_GENERATE_KWARGS}


def robust_params(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The call's parameters over the recommended robust ones (`ROBUST_PARAMS`): what the call gives wins, and its
    generate_kwargs are laid over the robust ones key by key."""
    params = dict(params or {})
    kwargs = params.get("generate_kwargs")
    merged = {**ROBUST_PARAMS, **params}
    merged["generate_kwargs"] = {**ROBUST_GENERATE_KWARGS, **(kwargs if isinstance(kwargs, dict) else {})}
    if kwargs is not None and not isinstance(kwargs, dict):
        merged["generate_kwargs"] = kwargs  # not a dict: the pipeline says so
    return merged


# GenerationConfig fields a pipeline call may not change: they would change the shape of what forward returns.
RESERVED_OPTIONS = ("num_return_sequences", "output_scores", "output_cross_attentions", "alignment_heads")


@dataclasses.dataclass(frozen=True)
class WhisperCall:
    """The decoding settings of one pipeline call, resolved and checked once (`WhisperDecoding.prepare_forward`)
    before any batch runs."""

    config: Any  # the GenerationConfig: the checkpoint's, with the call's generate_kwargs and pipeline defaults
    prompt: dict[str, Any]  # language, task, prompt_ids and long_form, as `transcribe` takes them
    return_timestamps: bool | str
    return_language: bool
    progress: bool


class WhisperDecoding:
    """Whisper (speech-seq2seq): each model item (a chunk, or a whole input) decoded window by window by
    `transcribe` (lightpipe.whisper.longform), the items of one input merged by `decode_asr` (transformers'
    Whisper `_decode_asr`).

    forward returns, per item (one list entry each, of its own length): "tokens", the kept tokens of its windows
    (prompts and end-of-text left out, as transformers' Whisper generate returns them), with return_language the
    prompt's language token in front; with return_timestamps="word" also "token_timestamps", the start of each
    token in seconds from the item's start, each item aligned alone (so that batching changes nothing)."""

    name = "speech-seq2seq"
    align_to = 1  # windows are cut at any sample: Whisper pads every window to 30 s anyway
    min_samples = 1

    def __init__(self, pipeline: "AutomaticSpeechRecognitionPipeline", folder: Path | None):
        from ..whisper.text import WhisperVocabulary
        from ..whisper.tokens import WhisperTokens

        self.model = pipeline.model
        self.feature_extractor = pipeline.feature_extractor
        if pipeline.tokenizer is None:
            raise InvalidInput("a Whisper pipeline needs the checkpoint's tokenizer; pass its folder as tokenizer=.")
        if self.feature_extractor.kind != "whisper":
            raise InvalidInput("a Whisper model needs a Whisper (log-mel) feature extractor, not a "
                               f"{self.feature_extractor.kind} one.")
        raw = _generation_config_dict(folder)
        self.generation_config = _generation_config(raw, self.model.config, folder)
        # The one special-token object of this checkpoint: generation_config.json's ids, else the tokenizer's.
        self.tokens = WhisperTokens.from_sources(raw or self.generation_config, pipeline.tokenizer.token_to_id)
        self.vocabulary = WhisperVocabulary(pipeline.tokenizer, self.tokens)
        self.alignment_heads = _alignment_heads(raw, folder)
        self.padding = Padding(values={"input_features": float(self.feature_extractor.padding_value),
                                       "attention_mask": 0})
        # Seconds per timestamp step: one window over the encoder's positions (30 s / 1500 = 0.02 s).
        self.time_precision = self.feature_extractor.chunk_length / self.model.config.max_source_positions

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: dict[str, Any]) -> None:
        stamps = params.get("return_timestamps")
        if stamps not in (None, False) and stamps not in WHISPER_TIMESTAMPS:
            raise InvalidInput(f"Whisper gives return_timestamps=True (segments) or 'word', not {stamps!r} "
                               "(no 'char' timestamps).")
        if stamps == "word" and not self.alignment_heads:
            raise InvalidInput("return_timestamps='word' needs alignment_heads in the checkpoint's "
                               "generation_config.json (the cross-attention heads that follow the audio).")
        language = params.get("return_language")
        if language is not None and not isinstance(language, bool):
            raise InvalidInput(f"return_language must be True or False, not {language!r}.")
        if "generate_kwargs" in params or "max_new_tokens" in params or "return_timestamps" in params:
            self.options(params.get("generate_kwargs"), params.get("max_new_tokens"), stamps)

    def options(self, generate_kwargs: dict | None, max_new_tokens: int | None, return_timestamps=None):
        """The call's generation settings -> (GenerationConfig, whisper_generate keyword arguments).

        As transformers' pipeline: generate_kwargs and max_new_tokens on top of the checkpoint's generation
        config; num_beams=5 and max_new_tokens=256 where neither the call nor the checkpoint set them (a
        checkpoint's max_length counts as setting the length)."""
        kwargs = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        whisper = {k: kwargs.pop(k) for k in WHISPER_OPTIONS if k in kwargs}
        long_form = {k: kwargs.pop(k) for k in LONG_FORM_OPTIONS if k in kwargs}
        reserved = sorted(set(kwargs) & set(RESERVED_OPTIONS))
        if reserved:
            raise InvalidInput(f"generate_kwargs {', '.join(reserved)} cannot be set in the speech-recognition "
                               "pipeline: it returns one transcription per input.")
        if "return_timestamps" in kwargs:
            raise InvalidInput("pass return_timestamps as a pipeline parameter, not in generate_kwargs.")
        config = self.generation_config
        defaults = {}
        if "num_beams" not in kwargs and config.num_beams == 1:
            defaults["num_beams"] = PIPELINE_NUM_BEAMS
        length_set = config.max_new_tokens is not None or config.max_length not in (None, REFERENCE_MAX_LENGTH)
        if not ({"max_new_tokens", "max_length"} & set(kwargs)) and not length_set:
            defaults["max_new_tokens"] = PIPELINE_MAX_NEW_TOKENS
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            defaults["max_new_tokens"] = None  # the call's max_length rules
        config = config.replace(**{**defaults, **kwargs})
        prompt_ids = whisper.get("prompt_ids")
        if prompt_ids is not None:
            if isinstance(prompt_ids, (torch.Tensor, np.ndarray)):
                prompt_ids = prompt_ids.reshape(-1).tolist()
            if not isinstance(prompt_ids, (list, tuple)) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt_ids):
                raise InvalidInput("prompt_ids must be a list of token ids (e.g. from the tokenizer's encoding of "
                                   "the previous text).")
            whisper["prompt_ids"] = [int(t) for t in prompt_ids]
        from ..whisper.decoding import check_prompt_options
        from ..whisper.longform import LongFormOptions

        check_prompt_options(config, whisper.get("language"), whisper.get("task"), bool(return_timestamps),
                             tokens=self.tokens)
        whisper["long_form"] = LongFormOptions.build(config, **long_form)
        return config, whisper

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        """The call's forward parameters -> {"call": WhisperCall}, built once per call."""
        return_timestamps = self._return_timestamps(params.get("return_timestamps"))
        config, prompt = self.options(params.get("generate_kwargs"), params.get("max_new_tokens"), return_timestamps)
        return {"call": WhisperCall(config, prompt, return_timestamps, bool(params.get("return_language")),
                                    bool(params.get("progress")))}

    def _return_timestamps(self, return_timestamps):
        # A checkpoint whose generation config says return_timestamps gives them unasked, as in transformers.
        return return_timestamps or self.generation_config.extra.get("return_timestamps") or False

    # ------------------------------------------------------------------ stages
    def features(self, audio: np.ndarray, whole: bool = False) -> dict[str, torch.Tensor]:
        """One item -> {"input_features" (frames, n_mels), "attention_mask" (frames,), "frames" ()}.

        A chunk, or a whole input of up to 30 s, is padded to the feature extractor's 30 s (as transformers'
        pipeline does); a whole input longer than that keeps all its frames for sequential decoding. Features are
        stored frames first so that long items of different lengths pad along time when batched; "frames" is the
        item's own width, which bounds its decoding loop whatever the batch is padded to."""
        long_form = whole and self.feature_extractor.n_samples is not None and len(audio) > self.feature_extractor.n_samples
        out = self.feature_extractor(audio, long_form=long_form, return_attention_mask=True)
        features = out["input_features"]
        return {"input_features": features.transpose(0, 1), "attention_mask": out["attention_mask"],
                "frames": torch.tensor(features.shape[-1])}

    @property
    def max_window_seconds(self) -> float:
        """vad_filter packs speech regions into windows of at most Whisper's own (30 s)."""
        return float(self.feature_extractor.chunk_length)

    def empty_features(self) -> dict[str, torch.Tensor]:
        """The features of an item without audio (vad_filter found no speech): no frames, never decoded."""
        own = self.features(np.zeros(1, dtype=np.float32))
        return {"input_features": own["input_features"][:0], "attention_mask": own["attention_mask"][:0],
                "frames": torch.tensor(0)}

    def forward(self, batch: dict[str, torch.Tensor], call: WhisperCall) -> dict[str, list]:
        from ..whisper.longform import transcribe

        frames = batch["frames"].tolist()
        if 0 in frames:  # items without speech (vad_filter) decode to nothing; the others as a batch of their own
            rows = [i for i, f in enumerate(frames) if f > 0]
            results: dict[str, list] = {"tokens": [[] for _ in frames]}
            if call.return_timestamps == "word":
                results["token_timestamps"] = [torch.zeros(0) for _ in frames]
            if rows:
                decoded = self.forward({k: v[rows] for k, v in batch.items()}, call)
                for key, values in decoded.items():
                    for row, value in zip(rows, values):
                        results[key][row] = value
            return results
        features = batch["input_features"].transpose(1, 2)  # (B, n_mels, frames)
        bar = self._audio_progress_bar(frames) if call.progress else None
        try:
            transcripts = transcribe(
                self.model, features.to(next(self.model.parameters()).dtype), frames, call.config,
                timestamps=bool(call.return_timestamps), tokens=self.tokens,
                alignment_heads=self.alignment_heads if call.return_timestamps == "word" else None,
                audio_frames=batch["attention_mask"].sum(dim=-1).tolist(), time_precision=self.time_precision,
                on_window=None if bar is None else lambda advanced: bar.update(advanced * self.seconds_per_frame),
                **call.prompt)
        finally:
            if bar is not None:
                bar.close()
        if call.return_language:
            transcripts = self._with_language(transcripts)
        result: dict[str, list] = {"tokens": [t.tokens for t in transcripts]}
        if call.return_timestamps == "word":
            result["token_timestamps"] = [t.token_times for t in transcripts]
        return result

    @property
    def seconds_per_frame(self) -> float:
        return self.feature_extractor.hop_length / self.feature_extractor.sampling_rate

    def _audio_progress_bar(self, frames: list[int]):
        """With progress=True, a second bar in seconds of audio for batches holding audio longer than one
        window: an hour-long file is one item of the pipeline's own bar, decoded over minutes window by window."""
        if max(frames, default=0) <= self.model.config.frames:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=round(sum(frames) * self.seconds_per_frame, 2), desc="audio decoded", unit="s",
                    leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")

    def _with_language(self, transcripts: list) -> list:
        """The prompt's language token put in front of each transcript, so that `decode_asr` can name the language
        (transformers re-adds it from the unstripped sequence the same way); the token is heard at the start."""
        if any(t.language is None for t in transcripts):
            return transcripts
        return [dataclasses.replace(t, tokens=[t.language] + t.tokens,
                                    token_times=None if t.token_times is None else
                                    torch.cat([torch.zeros(1), t.token_times]))
                for t in transcripts]

    def postprocess(self, outputs: list[dict[str, Any]], metas: list[WindowMeta],
                    return_timestamps=None, return_language=None, **params) -> dict[str, Any]:
        from ..whisper.text import decode_asr, stride_in_seconds

        return_timestamps = self._return_timestamps(return_timestamps)
        rate = self.feature_extractor.sampling_rate
        if metas[0]["timeline"] is not None:
            return self._speech_windows(outputs, metas, return_timestamps, bool(return_language))
        model_outputs = []
        for out, meta in zip(outputs, metas):
            item = {"tokens": out["tokens"]}
            if "token_timestamps" in out:
                item["token_timestamps"] = out["token_timestamps"]
            if meta["stride"] is not None:
                item["stride"] = stride_in_seconds(meta["stride"], rate)
            model_outputs.append(item)
        text, optional = decode_asr(self.vocabulary, model_outputs, return_timestamps=return_timestamps,
                                    return_language=bool(return_language), time_precision=self.time_precision)
        return {"text": text, **optional}

    def _speech_windows(self, outputs: list[dict[str, Any]], metas: list[WindowMeta], return_timestamps,
                        return_language: bool) -> dict[str, Any]:
        """vad_filter: each window of speech regions merged alone by `decode_asr` (times from the window's start), its
        segment and word times mapped back through its pieces to the input's timeline. A segment left open at the
        window's end (no end timestamp) ends where the window's audio does."""
        from ..whisper.text import decode_asr

        rate = self.feature_extractor.sampling_rate
        texts: list[str] = []
        chunks: list[dict[str, Any]] = []
        for out, meta in zip(outputs, metas):
            window = meta["timeline"]
            if not window.pieces:
                continue
            item = {"tokens": out["tokens"]}
            if "token_timestamps" in out:
                item["token_timestamps"] = out["token_timestamps"]
            text, optional = decode_asr(self.vocabulary, [item], return_timestamps=return_timestamps,
                                        return_language=return_language, time_precision=self.time_precision)
            texts.append(text)
            for chunk in optional.get("chunks", []):
                if "timestamp" in chunk:
                    start, end = chunk["timestamp"]
                    if start is None or end is None:  # an open segment ends where the window's audio does
                        chunk["timestamp"] = (window.start / rate if start is None else window.to_original(start, rate),
                                              window.end / rate if end is None else window.to_original(end, rate, True))
                    elif return_timestamps == "word":
                        chunk["timestamp"] = window.word_to_original(start, end, rate)
                    else:
                        chunk["timestamp"] = window.segment_to_original(start, end, rate)
                chunks.append(chunk)
        result: dict[str, Any] = {"text": "".join(texts)}
        if return_timestamps or return_language:
            result["chunks"] = chunks
        return result


def _generation_config_dict(folder) -> dict[str, Any]:
    """generation_config.json of the model's folder (made from the CTranslate2 files for such a folder)."""
    from ..loading import load_generation_config

    return load_generation_config(Path(folder)) if folder and Path(folder).is_dir() else {}


def _generation_config(raw: dict[str, Any], model_config, folder):
    """The checkpoint's generation settings; without generation_config.json, those config.json kept (as
    transformers falls back to)."""
    from ..generation.generate import GenerationConfig

    if raw:
        try:
            return GenerationConfig.from_dict(raw)
        except InvalidInput as e:
            raise CheckpointError(f"{folder}: invalid generation_config.json: {e}") from e
    if folder and Path(folder).is_dir():
        return GenerationConfig.from_folder(folder)
    options = {k: getattr(model_config, k) for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id",
                                                     "bos_token_id", "suppress_tokens", "begin_suppress_tokens")}
    return GenerationConfig.from_dict({k: v for k, v in options.items() if v is not None})


def _alignment_heads(raw: dict[str, Any], folder) -> list[tuple[int, int]] | None:
    """generation_config.json's alignment_heads: the [decoder layer, head] pairs whose cross-attention follows the
    audio (word timestamps need them); None when the checkpoint names none."""
    heads = raw.get("alignment_heads")
    if not heads:
        return None
    pairs_ok = isinstance(heads, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                             for i in p) for p in heads)
    if not pairs_ok:
        raise CheckpointError(f"{folder}: alignment_heads in generation_config.json must be a list of "
                              f"[layer, head] pairs, not {heads!r}.")
    return [(int(layer), int(head)) for layer, head in heads]


def seq2seq_decoding(pipeline: "AutomaticSpeechRecognitionPipeline", folder: Path | None) -> WhisperDecoding:
    """The decoding of speech-seq2seq models: Whisper is the one lightpipe has."""
    if getattr(pipeline.model.config, "model_type", None) != "whisper":
        raise UnsupportedModel(f"automatic-speech-recognition supports Whisper among speech-seq2seq models, not "
                               f"{type(pipeline.model).__name__}.")
    return WhisperDecoding(pipeline, folder)


# ---------------------------------------------------------------------------------------------- pipeline
def _head_of(model) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    for head, cls in models.architecture_module(config.model_type).HEADS.items():
        if type(model) is cls:
            return head
    return None


def _is_seconds(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value >= 0


class AutomaticSpeechRecognitionPipeline(Pipeline):
    """Audio -> {"text": str}, optionally with timestamped "chunks"; see the module docstring."""

    task = "automatic-speech-recognition"
    components: ClassVar[tuple[str, ...]] = ("tokenizer", "feature_extractor")
    file_is_one_input = True  # pipe(open("speech.flac", "rb")) is one audio file, not a stream of its lines
    preprocess_params = ("chunk_length_s", "stride_length_s", "ignore_warning", "vad_filter", "vad_parameters")
    # progress also reaches forward: Whisper's window loop shows how far it has come in long audio.
    forward_params = ("generate_kwargs", "max_new_tokens", "return_timestamps", "return_language", "progress")
    postprocess_params = ("return_timestamps", "return_language")

    def __init__(self, model, tokenizer=None, *, feature_extractor=None, folder=None, **kwargs):
        """folder: the checkpoint's folder, where its generation_config.json (Whisper) or vocabulary (CTC) is read;
        pipeline() passes it."""
        if feature_extractor is None:
            raise InvalidInput("automatic-speech-recognition needs a feature_extractor (the checkpoint's "
                               "preprocessor_config.json); pass its folder as feature_extractor=.")
        self.model, self.tokenizer, self.feature_extractor = model, tokenizer, feature_extractor
        folder = Path(folder) if folder else None
        # Where the tokenizer was read from: a CTC vocabulary lives beside it (a tokenizer given apart has its own);
        # it also stands in for the checkpoint folder of a model given without one.
        tokenizer_folder = Path(tokenizer.name_or_path) if getattr(tokenizer, "name_or_path", "") else None
        head = _head_of(model)
        if head == "ctc":
            vocabulary_folder = tokenizer_folder or folder
            if vocabulary_folder is None:
                raise InvalidInput("a CTC model needs its vocabulary (vocab.json): pass the checkpoint's folder as "
                                   "tokenizer=.")
            self.decoding = CTCDecoding(self, CTCVocabulary.from_folder(vocabulary_folder))
        elif head == "speech-seq2seq":
            self.decoding = seq2seq_decoding(self, folder or tokenizer_folder)
        else:
            raise UnsupportedModel(f"automatic-speech-recognition needs a CTC or speech-seq2seq model, not "
                                   f"{type(model).__name__}.")
        super().__init__(model, tokenizer, feature_extractor=feature_extractor, folder=folder, **kwargs)

    @property
    def multilingual(self) -> bool:
        """Whether the model takes a language (multilingual Whisper); False for English-only Whisper and CTC."""
        tokens = getattr(self.decoding, "tokens", None)
        return bool(tokens is not None and tokens.multilingual)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        chunk = params.get("chunk_length_s")
        if chunk is not None and not _is_seconds(chunk):
            raise InvalidInput(f"chunk_length_s must be a non-negative number of seconds (0: no chunking), not {chunk!r}.")
        stride = params.get("stride_length_s")
        pair = stride if isinstance(stride, (list, tuple)) else [stride]
        if stride is not None and (len(pair) not in (1, 2) or not all(_is_seconds(s) for s in pair)):
            raise InvalidInput(f"stride_length_s must be a number of seconds or a (left, right) pair, not {stride!r}.")
        vad = params.get("vad_filter")
        if vad is not None and not isinstance(vad, bool):
            raise InvalidInput(f"vad_filter must be True or False, not {vad!r}.")
        if params.get("vad_parameters") is not None:
            from ..vad import vad_options

            vad_options(params["vad_parameters"])
        kwargs = params.get("generate_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidInput(f"generate_kwargs must be a dict, not {type(kwargs).__name__}.")
        tokens = params.get("max_new_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise InvalidInput(f"max_new_tokens must be a positive integer, not {tokens!r}.")
        self.decoding.check_params(params)

    def collate_padding(self) -> Padding:
        return self.decoding.padding

    # ------------------------------------------------------------------ the three stages
    def preprocess(self, inputs, chunk_length_s=None, stride_length_s=None, ignore_warning=None, vad_filter=False,
                   vad_parameters=None) -> list[ModelItem]:
        item = self.feature_extractor.load(inputs)
        audio, rate = item.array, self.feature_extractor.sampling_rate
        if vad_filter:
            return self._speech_windows(audio, item.extra, chunk_length_s, vad_parameters)
        if len(audio) < self.decoding.min_samples:
            raise InvalidInput(f"the audio is {len(audio)} samples long; this model needs at least "
                               f"{self.decoding.min_samples} samples ({self.decoding.min_samples / rate:g} s at {rate} Hz).")
        if chunk_length_s:
            if isinstance(stride_length_s, (list, tuple)) and len(stride_length_s) == 1:
                stride_length_s = stride_length_s[0]
            sizes = window_sizes(chunk_length_s, stride_length_s, rate, self.decoding.align_to)
            if sizes[0] < self.decoding.min_samples:
                raise InvalidInput(f"chunk_length_s={chunk_length_s} is shorter than this model's shortest input "
                                   f"({self.decoding.min_samples / rate:g} s).")
            windows = self._runnable(chunk_windows(len(audio), *sizes))
        else:
            windows = [(0, len(audio), item.stride)]  # a dict input's own stride, if it gave one
        return [
            ModelItem(self.decoding.features(audio[start:end], whole=not chunk_length_s),
                      meta=WindowMeta(samples=end - start, stride=stride, start=start, extra=item.extra, timeline=None),
                      is_last=i == len(windows) - 1)
            for i, (start, end, stride) in enumerate(windows)
        ]

    def _speech_windows(self, audio: np.ndarray, extra: dict, chunk_length_s, vad_parameters) -> list[ModelItem]:
        """vad_filter: the audio's speech regions (Silero VAD, `lightpipe.vad`), back to back, packed into windows of
        at most `chunk_length_s` (Whisper: at most its 30 s window; default 30 s), each one model item (see
        processing/regions.py). Audio without speech gives one empty item, which decodes to nothing."""
        from ..processing.regions import PackedWindow, pack_regions
        from ..vad import speech_regions, vad_options

        rate = self.feature_extractor.sampling_rate
        limit = self.decoding.max_window_seconds
        seconds = min(chunk_length_s, limit) if chunk_length_s else limit
        regions = speech_regions(audio, rate, **vad_options(vad_parameters)) if len(audio) else []
        spans = [(int(round(r["start"] * rate)), int(round(r["end"] * rate))) for r in regions]
        windows = [w for w in pack_regions(spans, int(seconds * rate), total=len(audio))
                   if w.samples >= self.decoding.min_samples]
        if not windows:
            return [ModelItem(self.decoding.empty_features(), is_last=True,
                              meta=WindowMeta(samples=0, stride=None, start=0, extra=extra, timeline=PackedWindow(())))]
        return [ModelItem(self.decoding.features(window.gather(audio)), is_last=i == len(windows) - 1,
                          meta=WindowMeta(samples=window.samples, stride=None, start=window.start, extra=extra,
                                          timeline=window))
                for i, window in enumerate(windows)]

    def _runnable(self, windows: list) -> list:
        """Drop a final window too short for the model (possible only with strides shorter than its
        receptive field, where transformers fails); the window before it then keeps its right side."""
        if len(windows) > 1 and windows[-1][1] - windows[-1][0] < self.decoding.min_samples:
            windows = windows[:-1]
            start, end, (samples, left, _) = windows[-1]
            windows[-1] = (start, end, (samples, left, 0))
        return windows

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.decoding.prepare_forward(params)

    def forward(self, batch: dict[str, torch.Tensor], **params) -> dict[str, Any]:
        return self.decoding.forward(batch, **params)

    def postprocess(self, outputs: list[dict[str, Any]], metas: list[WindowMeta], **params) -> dict[str, Any]:
        extra: dict[str, list] = {}
        for meta in metas:  # transformers returns a dict input's extra keys once per window
            for key, value in meta["extra"].items():
                extra.setdefault(key, []).append(value)
        return {**self.decoding.postprocess(outputs, metas, **params), **extra}
