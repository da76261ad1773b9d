"""A hard stop on runaway repetition, Whisper's commonest hallucination ("Thank you for watching." again and again
over silence, " . . . ." for 256 tokens, "Mhm." 28 times in a 0.1 s clip).

`max_ngram_repeats=R` (a generate_kwargs option of the ASR pipeline): the same run of text tokens (an n-gram, n up
to `MAX_NGRAM`) may come at most R times back to back. When a sequence's text tokens end with R + 1 copies, the
`RepetitionStop` processor makes end of text its only choice, so the loop ends there instead of at max_new_tokens.
Timestamp and control tokens are left out of the count: a sentence repeated as segments of its own repeats too.
The sequential loop then treats the window as a failed attempt (see longform.py): decoded again at the next
fallback temperature, skipped as silence when its no-speech probability is above no_speech_threshold, and else kept
with the copies past R cut off.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from ..errors import InvalidInput
from ..generation.processors import NEG_INF

MAX_NGRAM = 32  # the longest repeated run looked for, in tokens (a long sentence said again)
MIN_COMPRESSION_TOKENS = 32  # text tokens before the compression ratio is judged (short texts compress badly)


def compression_ratio(tokens: Sequence[int], vocab_size: int) -> float:
    """Bytes of the token ids over their zlib-compressed bytes: high for repetition loops (openai's test, on the
    token ids as transformers computes it)."""
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(int(t).to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


def check_max_ngram_repeats(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"max_ngram_repeats must be a positive integer (how many times in a row the same run of "
                           f"tokens may come), not {value!r}.")
    return int(value)


def repeated_tail(tokens: Sequence[int], max_repeats: int, max_ngram: int = MAX_NGRAM) -> int | None:
    """Where the copy past `max_repeats` starts when `tokens` end with max_repeats + 1 back-to-back copies of one
    n-gram (n <= max_ngram; the shortest such n), else None. Cutting there keeps max_repeats copies."""
    length = len(tokens)
    copies = max_repeats + 1
    for n in range(1, max_ngram + 1):
        span = n * copies
        if span > length:
            break
        if tokens[-1] != tokens[-1 - n]:
            continue
        unit = tokens[length - n:]
        start = length - span
        if all(tokens[start + k] == unit[k % n] for k in range(span - n)):
            return length - n
    return None


def runaway(text: Sequence[int], max_repeats: int, compression_threshold: float | None = None,
            vocab_size: int | None = None) -> bool:
    """Whether text tokens loop: they end with max_repeats + 1 copies of one n-gram, or (with a threshold) they are
    at least MIN_COMPRESSION_TOKENS long and compress better than `compression_threshold` (loops that vary, such as
    "Thank you for watching." twice, then "Thank you.", again and again)."""
    if repeated_tail(text, max_repeats) is not None:
        return True
    return (compression_threshold is not None and len(text) >= MIN_COMPRESSION_TOKENS
            and compression_ratio(text, vocab_size) > compression_threshold)


class RepetitionStop:
    """Logits processor: a row whose text tokens (ids below `text_end`, from `begin_index` on) loop (`runaway`) can
    only choose `eos_token_id` next (scored as its best token was)."""

    def __init__(self, max_repeats: int, eos_token_id: int, begin_index: int, text_end: int,
                 compression_threshold: float | None = None, vocab_size: int | None = None):
        self.max_repeats = max_repeats
        self.eos_token_id = eos_token_id
        self.begin_index = begin_index
        self.text_end = text_end
        self.compression_threshold = compression_threshold
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids[:, self.begin_index:].tolist()
        hit = [i for i, row in enumerate(rows)
               if runaway([t for t in row if t < self.text_end], self.max_repeats, self.compression_threshold,
                          self.vocab_size or scores.shape[-1])]
        if not hit:
            return scores
        scores = scores.clone()
        best = scores[hit].max(dim=-1).values
        scores[hit] = NEG_INF
        scores[hit, self.eos_token_id] = best
        return scores


def cut_repetition(tokens: list[int], max_repeats: int, text_end: int, timestamp_begin: int, timestamps: bool,
                   end_step: int, compression_threshold: float | None = None,
                   vocab_size: int | None = None) -> list[int] | None:
    """A window's tokens (end of text removed) -> the tokens with the copies past `max_repeats` cut off (or all of
    them when it was the compression ratio that stopped them), or None when they do not loop (`runaway`).

    With timestamps, the cut tokens end with a lone timestamp (the end of the last segment kept, or `end_step`, the
    window's end in timestamp steps, when the cut fell inside a segment), so the window counts as complete."""
    positions = [i for i, t in enumerate(tokens) if t < text_end]
    text = [tokens[i] for i in positions]
    cut = repeated_tail(text, max_repeats)
    if cut is not None:
        kept = tokens[: positions[cut]]
    elif runaway(text, max_repeats, compression_threshold, vocab_size):
        kept = list(tokens)
    else:
        return None
    if not timestamps:
        return kept
    trailing = 0
    while trailing < len(kept) and kept[len(kept) - 1 - trailing] >= timestamp_begin:
        trailing += 1
    if trailing:
        return kept[: len(kept) - trailing + 1]  # the first of them ends the last kept segment
    last = max((t for t in kept if t >= timestamp_begin), default=timestamp_begin)
    return kept + [max(last, timestamp_begin + end_step)]
