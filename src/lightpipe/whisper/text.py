"""Whisper's text side: token ids -> text, timestamps, word timings, and merged chunks of long audio.

Whisper's vocabulary is a byte-level BPE (text tokens below `<|endoftext|>`), then control tokens
(`<|endoftext|>` ... `<|notimestamps|>`), then 1501 timestamp tokens `<|0.00|>` ... `<|30.00|>`, one
every `TIME_PRECISION` seconds. Checkpoints disagree on whether the timestamp tokens are in
tokenizer.json (OpenAI's tiny.en conversion has 50363 tokens, the model 51864 logits), so every id is
classified by number, never by looking its text up: `id >= no_timestamps + 1` is a timestamp.

Two users:
- the ASR pipeline: `decode_asr(vocab, model_outputs, ...)` merges the outputs of the chunks of one
  input (overlapping windows, strides in seconds) into `(text, {"chunks": [...]})`, with the
  semantics of transformers' Whisper `_decode_asr`; word chunks group tokens into words here, their
  times come from `alignment.py`;
- sequential long-form decoding: `decode_with_offsets(vocab, ids)` gives text plus timed segments.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInput
from ..processing.text import Tokenizer
from .tokens import LANGUAGES, WhisperTokens, language_code

logger = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per timestamp step: a 30 s window over 1500 encoder positions
SEGMENT_SIZE = 1500  # encoder positions (timestamp steps) in one 30 s window

# Languages written without spaces between words: words are cut at whole unicode characters instead.
NO_SPACE_LANGUAGES = frozenset({"chinese", "japanese", "thai", "lao", "myanmar", "cantonese"})
# Punctuation glued to the next word (opening marks) or to the previous one (closing marks) in word timings.
PREPEND_PUNCTUATIONS = "\"'“¡¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
TIMESTAMP_TEXT = re.compile(r"<\|(\d+\.\d+)\|>")  # a timestamp token rendered as text by tokenizers that have them
REPLACEMENT_CHAR = "\ufffd"  # what decoding gives for the bytes of an incomplete UTF-8 character


# ---------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class WhisperVocabulary:
    """The tokenizer, and the ids of Whisper's control tokens (`tokens`): what turns ids into text."""

    tokenizer: Tokenizer
    tokens: WhisperTokens

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, generation_config: dict[str, Any] | None = None) -> "WhisperVocabulary":
        """Ids from generation_config.json where it names them, else from the tokenizer's token strings."""
        return cls(tokenizer, WhisperTokens.from_sources(generation_config, tokenizer.token_to_id))

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Tokenizer | None = None) -> "WhisperVocabulary":
        """A checkpoint folder: its tokenizer files and generation_config.json (optional)."""
        folder = Path(folder)
        config: dict[str, Any] = {}
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        return cls.from_tokenizer(tokenizer or Tokenizer.from_folder(folder), config if isinstance(config, dict) else {})

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, timestamps left out (also when the tokenizer spells them as "<|1.08|>" tokens);
        with skip_special_tokens the control tokens too, whatever tokenizer.json says of them."""
        tokens = self.tokens
        keep = tokens.is_text if skip_special_tokens else (lambda i: not tokens.is_timestamp(i))
        text = self.tokenizer.decode([i for i in ids if keep(i)], skip_special_tokens=skip_special_tokens)
        return TIMESTAMP_TEXT.sub("", text)

    def strip_prompt(self, ids: list[int]) -> list[int]:
        """<|startofprev|> previous text <|startoftranscript|> ... -> <|startoftranscript|> ...

        The prompt is context the model was given, not what it heard. With no <|startoftranscript|>
        after it, nothing was transcribed."""
        sot_prev, sot = self.tokens.sot_prev, self.tokens.sot
        if not ids or sot_prev is None or ids[0] != sot_prev:
            return ids
        return ids[ids.index(sot):] if sot in ids else []


def _id_list(values: Any, what: str) -> list:
    """A 1-D sequence (list, numpy array, torch tensor, or one row of shape (1, T)) -> a Python list."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        values = values.numpy()
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise InvalidInput(f"{what} must be one sequence (shape (T,) or (1, T)), not shape {array.shape}.")
    return array.tolist()


def decode_text(vocab: WhisperVocabulary, ids: Any, skip_special_tokens: bool = False) -> str:
    """One generated sequence -> text, as transformers' WhisperTokenizer.decode: timestamps removed, and with
    skip_special_tokens the prompt (<|startofprev|> ...) and the control tokens too."""
    ids = [int(i) for i in _id_list(ids, "ids")]
    if skip_special_tokens:
        ids = vocab.strip_prompt(ids)
    return vocab.decode(ids, skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------- offsets
def decode_with_offsets(vocab: WhisperVocabulary, ids: Any, *, skip_special_tokens: bool = False,
                        time_precision: float = TIME_PRECISION, segment_size: int = SEGMENT_SIZE) -> dict[str, Any]:
    """One sequence with timestamp tokens -> {"text", "offsets": [{"text", "timestamp": (start, end)}]}.

    As transformers' `decode(..., output_offsets=True)`. A segment runs from a timestamp to the next
    pair of timestamps (or the last timestamp); a text run without an end timestamp is not a segment.
    Sequential long-form output restarts its timestamps at each 30 s window: a timestamp lower than
    the previous one opens a new window, which starts `segment_size` steps later when the window ended
    on a single timestamp, or at the last segment's end when it ended on a pair."""
    ids = [int(i) for i in _id_list(ids, "ids")]
    text = decode_text(vocab, ids, skip_special_tokens=skip_special_tokens)
    return {"text": text, "offsets": _segments(vocab, ids, time_precision, segment_size)}


def _segments(vocab: WhisperVocabulary, ids: list[int], time_precision: float, segment_size: int) -> list[dict]:
    begin = vocab.tokens.timestamp_begin
    stamps = [i for i, token in enumerate(ids) if token >= begin]  # positions of timestamp tokens
    # Segment boundaries: the second token of each pair of adjacent timestamps, and after the last timestamp.
    cuts = [i for i in stamps if i > 0 and ids[i - 1] >= begin]
    if not cuts and len(stamps) <= 1:
        return []
    if stamps[-1] + 1 not in cuts:
        cuts.append(stamps[-1] + 1)
    segments = []
    start_at = stamps[0]
    window_max = 0  # highest timestamp step seen in the current window
    window_start = 0  # steps from the sequence's start to the current window's start
    for cut in cuts:
        piece = ids[start_at:cut]
        if len(piece) > 1:
            first, last = piece[0] - begin, piece[-1] - begin
            if first < window_max:  # timestamps restarted: a new window
                single_ending = start_at >= 2 and not (ids[start_at - 2] >= begin and ids[start_at - 1] >= begin)
                window_start += segment_size if single_ending else window_max
            window_max = last
            # Control tokens inside a segment stay in its text, as in the reference.
            segments.append({"text": vocab.decode(piece),
                             "timestamp": (first * time_precision + window_start * time_precision,
                                           last * time_precision + window_start * time_precision)})
        start_at = cut
    return segments


# ---------------------------------------------------------------------------------------------- words
def _split_on_unicode(vocab: WhisperVocabulary, tokens: list[int]) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Cut tokens wherever the decoded text so far ends on a whole character (a token can hold half of one)."""
    full = vocab.tokenizer.decode(tokens)
    words, word_tokens, indices = [], [], []
    current, current_indices = [], []
    offset = 0  # characters of `full` already given to words
    for index, token in enumerate(tokens):
        current.append(token)
        current_indices.append(index)
        text = vocab.tokenizer.decode(current)
        bad = text.find(REPLACEMENT_CHAR)
        # A replacement character is an unfinished character unless the full text has one there too.
        if bad < 0 or offset + bad >= len(full) or full[offset + bad] == REPLACEMENT_CHAR:
            words.append(text)
            word_tokens.append(current)
            indices.append(current_indices)
            current, current_indices = [], []
            offset += len(text)
    return words, word_tokens, indices


def _split_on_spaces(vocab: WhisperVocabulary, tokens: list[int]) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Whole characters joined into words: a new word starts at a space, a punctuation mark or a control token."""
    words, word_tokens, indices = [], [], []
    for piece, piece_tokens, piece_indices in zip(*_split_on_unicode(vocab, tokens)):
        # `in` on the whole punctuation string: as the reference, "" (a lone space) and runs such as "()" count.
        starts_word = (piece_tokens[0] >= vocab.tokens.eot or piece.startswith(" ")
                       or piece.strip() in string.punctuation or not words)
        if starts_word:
            words.append(piece)
            word_tokens.append(piece_tokens)
            indices.append(piece_indices)
        else:
            words[-1] += piece
            word_tokens[-1].extend(piece_tokens)
            indices[-1].extend(piece_indices)
    return words, word_tokens, indices


def _merge_punctuation(words: list[str], tokens: list[list[int]], indices: list[list[int]],
                       prepend: str = PREPEND_PUNCTUATIONS, append: str = APPEND_PUNCTUATIONS) -> None:
    """Glue opening marks (' "', ' (') to the next word and closing marks (',', '.') to the previous one, in place."""
    target = len(words) - 1
    for i in range(len(words) - 2, -1, -1):  # right to left, so runs of opening marks collect on one word
        if words[i].startswith(" ") and words[i].strip() in prepend:
            words[target] = words[i] + words[target]
            tokens[target] = tokens[i] + tokens[target]
            indices[target] = indices[i] + indices[target]
            words[i], tokens[i], indices[i] = "", [], []
        else:
            target = i
    target = 0
    for j in range(1, len(words)):  # left to right, so runs of closing marks collect on one word
        if not words[target].endswith(" ") and words[j] in append:
            words[target] += words[j]
            tokens[target] += tokens[j]
            indices[target] += indices[j]
            words[j], tokens[j], indices[j] = "", [], []
        else:
            target = j
    words[:] = [w for w in words if w]
    tokens[:] = [t for t in tokens if t]
    indices[:] = [i for i in indices if i]


def split_into_words(vocab: WhisperVocabulary, tokens: list[int], language: str | None = None
                     ) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Text tokens -> (words, tokens of each word, positions of each word's tokens), punctuation merged.

    Languages written without spaces (Chinese, Japanese, Thai, Lao, Burmese, Cantonese) are cut at
    each whole character; the others at spaces and punctuation. Default language: English."""
    name = LANGUAGES[language_code(language)] if language is not None else "english"
    split = _split_on_unicode if name in NO_SPACE_LANGUAGES else _split_on_spaces
    words, word_tokens, indices = split(vocab, list(tokens))
    _merge_punctuation(words, word_tokens, indices)
    return words, word_tokens, indices


def _word_chunks(vocab: WhisperVocabulary, tokens: list[int], times: list[tuple[float, float]], language: str | None,
                 return_language: bool, default_language: str | None) -> list[dict]:
    """Text tokens with (start, end) per token -> [{"text": word, "timestamp": (start, end)[, "language"]}]."""
    words, _, indices = split_into_words(vocab, tokens, language or default_language)
    extra = {"language": language} if return_language else {}
    return [{"text": word, "timestamp": (times[idx[0]][0], times[idx[-1]][1]), **extra}
            for word, idx in zip(words, indices)]


# ---------------------------------------------------------------------------------------------- merging
def merge_overlaps(sequences: list[list[int]], times: list[list] | None = None) -> tuple[list[int], list]:
    """Token runs from overlapping audio windows -> one run, each overlap kept once.

    Each next run is slid along the merged one; the alignment with the highest share of equal tokens
    wins (at least 2 equal; a tiny bonus per overlapping token prefers long alignments). The overlap is
    cut in its middle: its left half from the left run, its right half from the right run, since each
    window hears the middle of the overlap best from its own side. With `times` (one (start, end) per
    token), a pair of tokens only matches when the left one does not start later, and the times are
    cut the same way. Returns (tokens, times), times [] without `times`."""
    if not sequences:
        return [], []
    with_times = bool(times)
    left = list(sequences[0])
    left_times = list(times[0]) if with_times else []
    merged: list[int] = []
    merged_times: list = []
    for k, right in enumerate(sequences[1:], start=1):
        right_times = times[k] if with_times else []
        best, best_span = 0.0, (len(left), len(left), 0, 0)
        for shift in range(1, len(left) + len(right)):
            l0, l1 = max(0, len(left) - shift), min(len(left), len(left) + len(right) - shift)
            r0, r1 = max(0, shift - len(left)), min(len(right), shift)
            if with_times:
                matches = sum(1 for a in range(l1 - l0)
                              if left[l0 + a] == right[r0 + a] and left_times[l0 + a] <= right_times[r0 + a])
            else:
                matches = int(np.sum(np.asarray(left[l0:l1]) == np.asarray(right[r0:r1])))
            score = matches / shift + shift / 10000.0
            if matches > 1 and score > best:
                best, best_span = score, (l0, l1, r0, r1)
        l0, l1, r0, r1 = best_span
        left_mid, right_mid = (l0 + l1) // 2, (r0 + r1) // 2
        merged.extend(left[:left_mid])
        left = list(right[right_mid:])
        if with_times:
            merged_times.extend(left_times[:left_mid])
            left_times = list(right_times[right_mid:])
    merged.extend(left)
    merged_times.extend(left_times)
    return merged, merged_times


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class _AsrDecoder:
    """The state carried across the chunks of one input while `decode_asr` walks their tokens.

    Text tokens accumulate in `pending` (one run per chunk) until an end timestamp closes the current
    output chunk; the runs are then merged by `merge_overlaps`, since neighbouring windows heard the
    same stride of audio. Timestamps inside a window's strides are not trusted to open or close a
    chunk: the neighbouring window, which hears that audio in its middle, decides."""

    def __init__(self, vocab: WhisperVocabulary, return_timestamps, return_language: bool, time_precision: float,
                 segment_size: int, default_language: str | None):
        self.vocab = vocab
        self.return_timestamps = return_timestamps
        self.words = return_timestamps == "word"
        self.return_language = return_language
        self.time_precision = time_precision
        self.segment_size = segment_size
        self.default_language = default_language
        self.language_names = vocab.tokens.languages  # language token id -> name
        self.language: str | None = None  # name of the last language token seen
        self.chunks: list[dict] = []
        self.chunk = self._new_chunk()
        self.time_offset = 0.0  # seconds from the input's start to the current window's start
        self.pending: list[list[int]] = []  # text runs of the current output chunk, one per window
        self.pending_times: list[list[tuple[float, float]]] = []
        self.skip = False  # the previous timestamp was dropped, so its pair partner is too

    def _new_chunk(self) -> dict:
        return {"language": self.language, "timestamp": [None, None], "text": ""}

    def _close_chunk(self) -> None:
        tokens, times = merge_overlaps(self.pending, self.pending_times)
        self.chunk["text"] = self.vocab.decode(tokens)
        if self.words:
            self.chunk["words"] = _word_chunks(self.vocab, tokens, times, self.language, self.return_language,
                                               self.default_language)
        self.chunks.append(self.chunk)

    def add(self, tokens: list[int], token_times: list[float] | None, stride) -> None:
        """One window's generated ids (prompt removed), per-token times (word mode) and stride in seconds."""
        vocab, precision, begin = self.vocab, self.time_precision, self.vocab.tokens.timestamp_begin
        trust_from = begin  # timestamp ids below this lie in the left stride
        distrust_from = None  # timestamp ids from this one on lie in the right stride
        # Sequential long-form output restarts its timestamps every 30 s window (see decode_with_offsets).
        window_max, window_max_before, window_start = 0.0, 0.0, 0.0
        if stride is not None:
            chunk_len, stride_left, stride_right = stride
            self.time_offset -= stride_left
            right_stride_start = chunk_len - stride_right
            if stride_left:
                trust_from = stride_left / precision + begin
            if stride_right:
                # The last timestamp always falls in the right stride; so do those before it that are in it.
                for token in reversed(tokens):
                    if token >= begin:
                        if distrust_from is not None and (token - begin) * precision < right_stride_start:
                            break
                        distrust_from = token
        current: list[int] = []
        current_times: list[tuple[float, float]] = []
        for i, token in enumerate(tokens):
            if vocab.tokens.is_control(token):
                language = self.language_names.get(token)
                if language is None:
                    continue
                # Without timestamps a change of language is the only place to cut the text into chunks.
                if self.language and language != self.language and not self.return_timestamps:
                    self.pending.append(current)
                    tokens_, _ = merge_overlaps(self.pending)
                    self.chunk["text"] = vocab.decode(tokens_)
                    self.chunks.append(self.chunk)
                    self.pending, current = [], []
                    self.chunk = self._new_chunk()
                self.chunk["language"] = language
                self.language = language
            elif token >= begin:
                seconds = float((token - begin) * precision)
                if seconds < window_max:  # a new 30 s window began
                    single_ending = i >= 2 and not (tokens[i - 1] >= begin and tokens[i - 2] >= begin)
                    if single_ending:
                        window_start += precision * self.segment_size
                    else:
                        window_max = window_max_before
                        window_start += window_max_before
                window_max_before, window_max = window_max, seconds
                time = round((token - begin) * precision + self.time_offset + window_start, 2)
                if distrust_from and token >= distrust_from:
                    # In the right stride: the next window decides. Timestamps come in pairs (an end, then
                    # the next start), so the partner of this one is dropped too.
                    self.skip = True
                elif self.skip or (self.pending and token < trust_from):
                    self.skip = False
                elif self.chunk["timestamp"][0] is None:
                    self.chunk["timestamp"][0] = time
                elif time != self.chunk["timestamp"][0]:  # an end equal to the start is a repeated start
                    self.chunk["timestamp"][1] = time
                    self.pending.append(current)
                    if self.words:
                        self.pending_times.append(current_times)
                    self._close_chunk()
                    self.pending, current, self.pending_times, current_times = [], [], [], []
                    self.chunk = self._new_chunk()
            else:
                current.append(token)
                if self.words:
                    if i >= len(token_times):
                        raise InvalidInput(f"token_timestamps has {len(token_times)} times for the text tokens of "
                                           f"{len(tokens)} tokens: every text token needs its time.")
                    start = round((0.0 if i == 0 else token_times[i - 1]) + self.time_offset, 2)
                    current_times.append((start, round(token_times[i] + self.time_offset, 2)))
        if stride is not None:
            self.time_offset += chunk_len - stride_right
        if current:
            self.pending.append(current)
            if self.words:
                self.pending_times.append(current_times)
        elif not any(self.pending):
            # Nothing heard yet in this output chunk: a start timestamp from this window must not stay open.
            self.chunk = self._new_chunk()
            self.pending, self.pending_times = [], []

    def finish(self) -> tuple[str, dict]:
        if self.pending:
            if self.return_timestamps:
                _warn_once("Whisper did not predict an ending timestamp, which can happen when audio is cut off in "
                           "the middle of a word; the last chunk has no end time.")
            self._close_chunk()
        text = "".join(chunk["text"] for chunk in self.chunks)
        if not (self.return_timestamps or self.return_language):
            return text, {}
        for chunk in self.chunks:
            if self.return_timestamps:
                chunk["timestamp"] = tuple(chunk["timestamp"])
            else:
                del chunk["timestamp"]
            if not self.return_language:
                del chunk["language"]
        if self.words:
            return text, {"chunks": [word for chunk in self.chunks for word in chunk["words"]]}
        return text, {"chunks": self.chunks}


def decode_asr(vocab: WhisperVocabulary, model_outputs: Sequence[dict], *, return_timestamps: bool | str | None = False,
               return_language: bool = False, time_precision: float = TIME_PRECISION,
               segment_size: int = SEGMENT_SIZE, language: str | None = None) -> tuple[str, dict]:
    """The generated ids of one input's chunks, in order -> (text, {"chunks": [...]} or {}).

    Each model output is a dict:
      "tokens": the generated ids of one window, shape (T,) or (1, T): text, control and timestamp
          ids; a leading <|startofprev|> prompt is removed.
      "stride" (optional): (chunk_len, stride_left, stride_right) in SECONDS for chunked audio: the
          window's length and the overlap shared with the previous / next window (0 at the ends).
      "token_timestamps" (needed for return_timestamps="word"): one time in seconds per entry of
          "tokens", relative to the window's start, aligned from the first token (it may stop before
          trailing padding, e.g. the <|endoftext|> a batch pads shorter sequences with).
    return_timestamps: False -> {}; True -> chunks {"text", "timestamp": (start, end)} from the
    timestamp tokens; "word" -> one chunk per word from token_timestamps. return_language adds
    "language" (a name such as "english", from the language tokens in "tokens") to each chunk.
    `language` (code or name) picks how words are split when no language token was seen.
    Semantics of transformers' Whisper `_decode_asr`."""
    if return_timestamps not in (None, False, True, "word"):
        raise InvalidInput(f"return_timestamps={return_timestamps!r} is not valid for Whisper; "
                           "use False, True (segments) or 'word'.")
    if language is not None:
        language = LANGUAGES[language_code(language)]
    decoder = _AsrDecoder(vocab, return_timestamps, bool(return_language), time_precision, segment_size, language)
    for number, output in enumerate(model_outputs):
        if "tokens" not in output:
            raise InvalidInput(f"model output {number} has no 'tokens'.")
        raw = [int(t) for t in _id_list(output["tokens"], "tokens")]
        tokens = vocab.strip_prompt(raw)
        token_times = None
        if return_timestamps == "word":
            if output.get("token_timestamps") is None:
                raise InvalidInput("return_timestamps='word' needs 'token_timestamps' in every model output.")
            token_times = [float(t) for t in _id_list(output["token_timestamps"], "token_timestamps")]
            token_times = token_times[len(raw) - len(tokens):]  # the prompt's times go with the prompt
        stride = output.get("stride")
        if stride is not None:
            stride = tuple(float(s) for s in stride)
            if len(stride) != 3:
                raise InvalidInput(f"stride must be (chunk_len, stride_left, stride_right) in seconds, not {stride}.")
        decoder.add(tokens, token_times, stride)
    return decoder.finish()


def stride_in_seconds(stride: tuple[int, int, int], sampling_rate: int) -> tuple[float, float, float]:
    """(chunk_len, stride_left, stride_right) in audio samples -> in seconds, the unit `decode_asr` takes."""
    chunk_len, left, right = stride
    return chunk_len / sampling_rate, left / sampling_rate, right / sampling_rate

