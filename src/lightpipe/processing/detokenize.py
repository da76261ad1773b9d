"""Incremental detokenisation for streaming.

Decoding one token at a time and joining the pieces is wrong in three ways: byte-level tokens may hold a
part of a UTF-8 character (decoded alone it is the replacement character U+FFFD), SentencePiece decoders
drop the leading space of the first token they see (so each piece loses its space), and the clean-up of
tokenization spaces looks across tokens ("do n't" -> "don't"). The Detokenizer re-decodes a short window of
the latest tokens instead and emits only text that can no longer change, so that

    "".join(pieces) + detok.finish() == tokenizer.decode(all_ids, skip_special_tokens=...,
                                                         clean_up_tokenization_spaces=...)

exactly, and no piece ends in the middle of a character.

The window: `_prefix` .. `_read` are tokens already emitted, decoded again only as context, and `_read` ..
end are new. A piece is decode(window) minus decode(context), emitted once it does not end in U+FFFD; the
context then moves up to the tokens just emitted. Both decodes start at the same token, so whatever a decoder
does to the first token of its input happens to both and cancels out. Windows start where the text before
them was whole, so a character never straddles one. Two rules reach further back and are held for: a run of
SentencePiece byte-fallback tokens decodes as a whole (one invalid byte spoils the run), and the clean-up
rules are applied to text cut only before a character none of them can match.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import InvalidInput
from .text import CLEAN_UP_SPACES, clean_up_tokenization

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole UTF-8 character
# Characters the clean-up rules can match, other than at their leading space: text may be cut for clean-up
# right before any other non-space character, since no rule can match across it.
CLEAN_UP_CHARS = frozenset("".join(before for before, _ in CLEAN_UP_SPACES))


class Detokenizer:
    """Token ids of one generated sequence in, stable text pieces out.

    `add(ids)` takes the next token id (or several) and returns the text that became final ("" while a
    character or a clean-up is incomplete); `finish()` returns the rest. `text` is everything emitted so
    far, `pending` the decoded text not yet emitted (it may still change)."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 clean_up_tokenization_spaces: bool | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.clean_up = tokenizer.cleans_up_spaces(clean_up_tokenization_spaces)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # first token of the context decoded again before the new tokens
        self._read = 0  # first token whose text has not been taken
        self._held = ""  # the end of it, waiting until the clean-up rules cannot change it
        self._finished = False
        # SentencePiece byte fallback decodes a run of byte tokens (<0xE4>) as a whole, and one invalid byte turns
        # every byte of the run into U+FFFD: text from a run is final only once the run has ended.
        self._byte_fallback = "ByteFallback" in repr(getattr(getattr(tokenizer, "backend", None), "decoder", None))
        # Skipped special tokens vanish before decoding, so byte runs continue across them.
        self._skipped = frozenset(getattr(tokenizer, "all_special_ids", ())) if skip_special_tokens else frozenset()

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append token id(s); return the newly final text (possibly "")."""
        if self._finished:
            raise InvalidInput("this Detokenizer has finished its sequence; start a new one for more tokens.")
        if getattr(token_ids, "ndim", 0) > 0 or isinstance(token_ids, (list, tuple, range)):
            self.ids.extend(_token_id(i) for i in token_ids)  # a list, or a (N,) tensor or array
        else:
            self.ids.append(_token_id(token_ids))
        return self._emit(self._take(final=False), final=False)

    def finish(self) -> str:
        """The text not emitted yet (an incomplete character decodes to U+FFFD here, as in a full decode).
        Ends the sequence."""
        piece = self._emit(self._take(final=True), final=True)
        self._finished = True
        return piece

    @property
    def pending(self) -> str:
        """Decoded text after `text` as it stands now: an incomplete character shows as U+FFFD and a clean-up
        rule may still change it. text + pending is the decode of all ids so far."""
        raw = self._held + self._new_text()
        return clean_up_tokenization(raw) if self.clean_up else raw

    # ------------------------------------------------------------------ decoding
    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _new_text(self) -> str:
        """Decoded text of the tokens not taken yet: the window's decode past its context's. (That the window's
        decode continues the context's is what makes streaming exact; the decoders of byte-level BPE,
        SentencePiece with or without byte fallback, WordPiece and CTC all keep it - see the tests.)"""
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        return window[len(context):]

    def _take(self, *, final: bool) -> str:
        """The new decoded text, once it does not end inside a character (at the end: whatever it is)."""
        new = self._new_text()
        if not final and (not new or new.endswith(REPLACEMENT) or self._in_byte_run()):
            return ""  # nothing new, or a character still incomplete: wait for the next token
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def _in_byte_run(self) -> bool:
        """Whether the last token decoded is a byte-fallback token such as <0xE4> (its run may go on)."""
        if not self._byte_fallback:
            return False
        last = next((i for i in reversed(self.ids) if i not in self._skipped), None)
        token = (self.tokenizer.id_to_token(last) if last is not None else None) or ""
        return len(token) == 6 and token.startswith("<0x") and token.endswith(">")

    # ------------------------------------------------------------------ clean-up and emission
    def _emit(self, new: str, *, final: bool) -> str:
        if self.clean_up:
            held = self._held + new
            cut = len(held) if final else _clean_up_cut(held)
            self._held = held[cut:]
            piece = clean_up_tokenization(held[:cut])
        else:
            piece = new
        self.text += piece
        return piece


def _clean_up_cut(text: str) -> int:
    """Where `text` can be cut so that clean_up_tokenization(text) == clean(text[:cut]) + clean(text[cut:]):
    right before the last character that no clean-up rule can match (a rule matching across the cut would
    have to contain it). 0 when there is none."""
    for index in range(len(text) - 1, -1, -1):
        if text[index] not in CLEAN_UP_CHARS:
            return index
    return 0


def _token_id(value: Any) -> int:
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # a 0-d tensor, numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"token ids must be integers, not {type(value).__name__}.")
    return value


# ----------------------------------------------------------------------------------------------
# Stop strings
