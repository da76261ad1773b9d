"""Whisper's text side: token ids -> text, timestamps, word timings, and merged chunks of long audio.

Whisper's vocabulary is a byte-level BPE (text tokens below `<|endoftext|>`), then control tokens
(`<|endoftext|>` ... `<|notimestamps|>`), then 1501 timestamp tokens `<|0.00|>` ... `<|30.00|>`, one
every `TIME_PRECISION` seconds. Checkpoints disagree on whether the timestamp tokens are in
tokenizer.json (OpenAI's tiny.en conversion has 50363 tokens, the model 51864 logits), so every id is
classified by number, never by looking its text up: `id >= no_timestamps + 1` is a timestamp.

Three users:
- the ASR pipeline: `decode_asr(vocab, model_outputs, ...)` merges the outputs of the chunks of one
  input (overlapping windows, strides in seconds) into `(text, {"chunks": [...]})`, with the
  semantics of transformers' Whisper `_decode_asr`;
- sequential long-form decoding: `decode_with_offsets(vocab, ids)` gives text plus timed segments;
- word timestamps: `token_timestamps(weights, ...)` aligns cross-attention to audio frames by DTW.
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
from .text import Tokenizer

logger = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per timestamp step: a 30 s window over 1500 encoder positions
SEGMENT_SIZE = 1500  # encoder positions (timestamp steps) in one 30 s window
MEDIAN_FILTER_WIDTH = 7  # frames; Whisper's default smoothing of cross-attention before DTW

# Whisper's languages, code -> name, in the model's token order.
LANGUAGES = dict(pair.replace("_", " ").split(":") for pair in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
    "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
    "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
    "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
    "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician "
    "mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
    "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
    "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit "
    "lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
    "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())
# Other names users type for a language.
LANGUAGE_ALIASES = {"burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
                    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
                    "castilian": "es", "mandarin": "zh"}
TASKS = ("translate", "transcribe")

# Languages written without spaces between words: words are cut at whole unicode characters instead.
NO_SPACE_LANGUAGES = frozenset({"chinese", "japanese", "thai", "lao", "myanmar", "cantonese"})
# Punctuation glued to the next word (opening marks) or to the previous one (closing marks) in word timings.
PREPEND_PUNCTUATIONS = "\"'“¡¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
TIMESTAMP_TEXT = re.compile(r"<\|(\d+\.\d+)\|>")  # a timestamp token rendered as text by tokenizers that have them
REPLACEMENT_CHAR = "\ufffd"  # what decoding gives for the bytes of an incomplete UTF-8 character


def language_code(language: str) -> str:
    """'English', 'en', 'mandarin' -> 'en', 'en', 'zh'; InvalidInput for a language Whisper does not know."""
    key = str(language).strip().lower()
    if key in LANGUAGES:
        return key
    names = {name: code for code, name in LANGUAGES.items()}
    if key in names:
        return names[key]
    if key in LANGUAGE_ALIASES:
        return LANGUAGE_ALIASES[key]
    raise InvalidInput(f"Whisper does not know the language {language!r}; use a code or a name such as "
                       f"'en' / 'english'. Known codes: {', '.join(LANGUAGES)}.")


# ---------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class WhisperVocabulary:
    """The tokenizer plus the ids of Whisper's control tokens, from generation_config.json or token names."""

    tokenizer: Tokenizer
    eot: int  # <|endoftext|>: the first control id; every id below it is text
    sot: int  # <|startoftranscript|>
    no_timestamps: int  # <|notimestamps|>: the last control id; timestamps follow it
    sot_prev: int | None = None  # <|startofprev|>: starts a prompt of previous text
    language_ids: tuple[tuple[str, int], ...] = ()  # (code, id) of each language token present
    task_ids: tuple[tuple[str, int], ...] = ()  # (task, id) for "translate" / "transcribe"

    @property
    def timestamp_begin(self) -> int:
        """Id of <|0.00|>; id t + k means k * time_precision seconds after the window's start."""
        return self.no_timestamps + 1

    def is_timestamp(self, token: int) -> bool:
        return token >= self.timestamp_begin

    def is_control(self, token: int) -> bool:
        """<|endoftext|>, <|startoftranscript|>, languages, tasks, <|notimestamps|> ...: never text."""
        return self.eot <= token < self.timestamp_begin

    def is_text(self, token: int) -> bool:
        return token < self.eot

    @property
    def languages(self) -> dict[int, str]:
        """Language token id -> language name ('english')."""
        return {i: LANGUAGES[code] for code, i in self.language_ids}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, generation_config: dict[str, Any] | None = None) -> "WhisperVocabulary":
        """Ids from generation_config.json where it names them, else from the tokenizer's token strings."""
        config = generation_config or {}

        def pick(key: str, token: str, required: bool = True) -> int | None:
            value = config.get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            found = tokenizer.token_to_id(token)
            if found is None and required:
                raise CheckpointError(
                    f"neither generation_config.json ({key}) nor the tokenizer ({token}) gives the id of {token}: "
                    "this does not look like a Whisper checkpoint."
                )
            return found

        eot = pick("eos_token_id", "<|endoftext|>")
        sot = pick("decoder_start_token_id", "<|startoftranscript|>")
        no_timestamps = pick("no_timestamps_token_id", "<|notimestamps|>")
        sot_prev = pick("prev_sot_token_id", "<|startofprev|>", required=False)
        if not eot < no_timestamps:
            raise CheckpointError(f"<|endoftext|> ({eot}) must come before <|notimestamps|> ({no_timestamps}) "
                                  "in a Whisper vocabulary; check generation_config.json.")
        lang_to_id = config.get("lang_to_id") if isinstance(config.get("lang_to_id"), dict) else {}
        languages = []
        for code in LANGUAGES:
            token = f"<|{code}|>"
            index = lang_to_id.get(token, tokenizer.token_to_id(token))
            if isinstance(index, int):
                languages.append((code, index))
        task_to_id = config.get("task_to_id") if isinstance(config.get("task_to_id"), dict) else {}
        tasks = []
        for task in TASKS:
            index = task_to_id.get(task, tokenizer.token_to_id(f"<|{task}|>"))
            if isinstance(index, int):
                tasks.append((task, index))
        return cls(tokenizer, eot=eot, sot=sot, no_timestamps=no_timestamps, sot_prev=sot_prev,
                   language_ids=tuple(languages), task_ids=tuple(tasks))

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
        keep = self.is_text if skip_special_tokens else (lambda i: not self.is_timestamp(i))
        text = self.tokenizer.decode([i for i in ids if keep(i)], skip_special_tokens=skip_special_tokens)
        return TIMESTAMP_TEXT.sub("", text)

    def strip_prompt(self, ids: list[int]) -> list[int]:
        """<|startofprev|> previous text <|startoftranscript|> ... -> <|startoftranscript|> ...

        The prompt is context the model was given, not what it heard. With no <|startoftranscript|>
        after it, nothing was transcribed."""
        if not ids or self.sot_prev is None or ids[0] != self.sot_prev:
            return ids
        return ids[ids.index(self.sot):] if self.sot in ids else []


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
    begin = vocab.timestamp_begin
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
        starts_word = (piece_tokens[0] >= vocab.eot or piece.startswith(" ")
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
        self.language_names = vocab.languages  # language token id -> name
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
        vocab, precision, begin = self.vocab, self.time_precision, self.vocab.timestamp_begin
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
            if vocab.is_control(token):
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


# ---------------------------------------------------------------------------------------------- alignment
def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through cost (tokens, frames) -> (token index, frame index) per step.

    Steps go diagonally, down (next token, same frame) or right (same token, next frame). When neither
    the diagonal nor the down step is strictly cheapest the path goes right, even where right costs
    more (diagonal == down < right): the reference does so, and equal paths need equal tie rules.
    Costs accumulate in float32 as in the reference.
    Cells on one anti-diagonal do not depend on each other: each diagonal is filled at once."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    total[0, 0] = 0
    for d in range(2, n + m + 1):  # d = i + j over the (n+1, m+1) grid, cells with i, j >= 1
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diag, down, right = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        take_diag = (diag < down) & (diag < right)
        take_down = ~take_diag & (down < diag) & (down < right)
        step = np.where(take_diag, 0, np.where(take_down, 1, 2))
        best = np.where(take_diag, diag, np.where(take_down, down, right))
        total[i, j] = cost[i - 1, j - 1] + best.astype(np.float64)
        trace[i, j] = step
    trace[0, :] = 2  # along the top edge only "right" is possible, along the left edge only "down"
    trace[:, 0] = 1
    i, j = n, m
    tokens, frames = [], []
    while i > 0 or j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(tokens[::-1]), np.array(frames[::-1])


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of odd `width` along the last axis, edges reflected."""
    if width <= 0 or width % 2 != 1:
        raise InvalidInput(f"the median filter width must be a positive odd number, not {width}.")
    half = width // 2
    if x.shape[-1] <= half:  # too short to reflect: left as is
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])  # reflect padding wants (N, C, L)
    padded = torch.nn.functional.pad(flat, (half, half), mode="reflect")
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., half].reshape(shape)


def alignment_weights(cross_attentions: Sequence[torch.Tensor], alignment_heads: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per decoder layer (B, heads, T, frames) cross-attention -> (B, len(alignment_heads), T, frames),
    the heads that follow the audio (generation_config.json's alignment_heads: [layer, head] pairs)."""
    return torch.stack([cross_attentions[layer][:, head] for layer, head in alignment_heads], dim=1)


def token_timestamps(weights: torch.Tensor, *, num_input_ids: int, time_precision: float = TIME_PRECISION,
                     num_frames: int | Sequence[int] | torch.Tensor | None = None,
                     median_filter_width: int = MEDIAN_FILTER_WIDTH) -> torch.Tensor:
    """Cross-attention of the alignment heads -> the time in seconds at which each token starts.

    weights: (B, heads, R, frames) or (heads, R, frames): the attention rows of the R tokens fed to the
        decoder (the `num_input_ids` prompt tokens, then each generated token but the last), over the
        encoder's frames (1500 for 30 s).
    num_frames: mel frames of real audio (one int, or one per sequence); attention beyond
        num_frames // 2 encoder frames is padding and is cut off.
    Returns (B, R + 1) or (R + 1,) float32: 0 for the prompt tokens, the DTW time of each generated
    token, and the last generated token (no attention row of its own) repeats the time before it.
    Rows are normalised per head over tokens, smoothed by a median over frames, averaged over heads,
    then aligned by `dtw` of their negation; a token's time is the frame where its path row starts.
    Equals transformers' WhisperGenerationMixin._extract_token_timestamps without beam indices."""
    single = weights.dim() == 3
    if single:
        weights = weights.unsqueeze(0)
    if weights.dim() != 4:
        raise InvalidInput(f"weights must have shape (B, heads, tokens, frames), not {tuple(weights.shape)}.")
    batch, rows = weights.shape[0], weights.shape[2]
    times = torch.zeros(batch, rows + 1, dtype=torch.float32)
    frames_each = None  # audio frames per sequence, when given as a sequence
    if isinstance(num_frames, int):
        weights = weights[..., : num_frames // 2]  # two mel frames per encoder frame
    elif num_frames is not None:
        frames_each = [int(f) for f in (num_frames.tolist() if isinstance(num_frames, torch.Tensor) else num_frames)]
        if len(set(frames_each)) == 1:
            weights = weights[..., : frames_each[0] // 2]
        # with several sequences per audio (num_return_sequences), each audio's count repeats
        frames_each = [f for f in frames_each for _ in range(max(1, batch // len(frames_each)))]
    weights = weights[:, :, num_input_ids:]  # the prompt is not aligned: its tokens are at 0 s
    if weights.shape[2] == 0:  # one generated token: nothing to align
        return times[0] if single else times
    if frames_each is None:
        weights = _normalise_and_smooth(weights, median_filter_width).mean(dim=1)  # (B, tokens, frames)
    for b in range(batch):
        if frames_each is None:
            matrix = weights[b]
        else:  # each sequence cut to its own audio, then normalised alone
            matrix = _normalise_and_smooth(weights[b, ..., : frames_each[b] // 2], median_filter_width).mean(dim=0)
        token_index, frame_index = dtw(-matrix.cpu().double().numpy())
        starts = np.diff(token_index, prepend=-1).astype(bool)  # first step on each token's row
        start_times = frame_index[starts] * time_precision
        times[b] = torch.from_numpy(np.concatenate([np.zeros(num_input_ids), start_times, start_times[-1:]]))
    return times[0] if single else times


def _normalise_and_smooth(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """(..., heads, tokens, frames): each head standardised over tokens, then median-filtered over frames."""
    std = torch.std(matrix, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(matrix, dim=-2, keepdim=True)
    return median_filter((matrix - mean) / std, width)
