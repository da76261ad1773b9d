"""Stopping criteria: small callables that say which rows are done after a decoding step.

Each criterion is `criterion(tokens, new_tokens) -> (rows,) bool`, with tokens the (rows, length) sequences so far
(the prompt included, the new tokens last) and new_tokens the (rows,) tokens just chosen; a row stops as soon as any
criterion of the list says so (`any_done`). Rows are the running rows only: rows that stopped before are not shown.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import InvalidInput

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def any_done(criteria: Sequence[Criterion], tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """(rows,) True where some criterion says the row is done."""
    done = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
    for criterion in criteria:
        done |= criterion(tokens, new_tokens)
    return done


class MaxLength:
    """Every row is done once the sequences reach `max_length` tokens (prompt included)."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        return torch.full_like(new_tokens, tokens.shape[1] >= self.max_length, dtype=torch.bool)


class EndOfSequence:
    """A row is done when its new token is one of the end-of-sequence ids."""

    def __init__(self, eos_token_ids: Sequence[int]):
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long)

    def __call__(self, tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        if self.eos.device != new_tokens.device:
            self.eos = self.eos.to(new_tokens.device)
        return torch.isin(new_tokens, self.eos)


class MaxTime:
    """Every row is done once `seconds` have passed since the criterion was made (transformers' max_time)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def __call__(self, tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        return torch.full_like(new_tokens, time.monotonic() >= self.deadline, dtype=torch.bool)


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """Where a stop string was found in a row's generated text: text[start:end] == stop. `start` is negative
    when the match began in the prompt's tail."""

    stop: str
    start: int
    end: int


class StopStrings:
    """Stop strings matched on decoded text, so a string split over several tokens (or inside one) is found.

    Generation stops after the token that completes a stop string, and the text returned keeps everything
    decoded up to that token's end: the stop string and whatever else that last token holds - as
    transformers' StopStringCriteria with its pipeline does. Use per row and step::

        seen = len(detok.text)                   # text emitted before this step (already searched)
        detok.add(token)
        match = stops.find(detok.text + detok.pending, new_from=seen)
        if match: stop this row; its text is detok.text + detok.finish()

    Like transformers, which matches on the whole token sequence, a stop string may begin in the prompt: pass
    the prompt's last characters as `prompt_tail` (decoded with its special tokens; `tail_length` of them are
    enough). Only matches that end in the generated text count.
    """

    def __init__(self, stop_strings: str | Iterable[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not isinstance(stop_strings, Iterable):
            raise InvalidInput("stop strings must be a string or a list of strings, "
                               f"not {type(stop_strings).__name__}.")
        stops = list(stop_strings)
        if not stops or not all(isinstance(stop, str) and stop for stop in stops):
            raise InvalidInput(f"stop strings must be non-empty strings; got {stops!r}.")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self.tail_length = max(len(stop) for stop in self.stops) - 1  # prompt characters a match can start in

    def find(self, text: str, *, new_from: int = 0, prompt_tail: str = "") -> StopMatch | None:
        """The stop string that ends first in `text` among matches ending after text[:new_from] (the part
        searched before), or None. Matches may begin in `prompt_tail`, the text just before `text`."""
        tail = prompt_tail[len(prompt_tail) - self.tail_length:] if self.tail_length else ""
        searched = tail + text
        offset = len(tail)  # searched[offset:] == text
        start_at = max(0, offset + new_from - self.tail_length)
        best: StopMatch | None = None
        for stop in self.stops:
            at = searched.find(stop, start_at)
            while at != -1 and at + len(stop) <= offset + new_from:  # ends inside the part searched before
                at = searched.find(stop, at + 1)
            if at == -1:
                continue
            match = StopMatch(stop, at - offset, at - offset + len(stop))
            if best is None or (match.end, match.start) < (best.end, best.start):
                best = match
        return best


class StopStringCriterion:
    """A row is done when a stop string ends in the text of its newest token, wherever token boundaries fall.

    `decode(ids) -> str` turns token ids into text (the tokenizer's decode, special tokens kept). Each step decodes
    only a window of the row's last tokens, long enough for the longest stop string even if every character took
    four byte tokens; a match counts when it ends past the text the window had before its newest token, so it may
    begin in the prompt (as transformers matches on the whole token sequence) but never lie wholly in it.
    """

    def __init__(self, stop_strings: str | Iterable[str], decode: Callable[[list[int]], str]):
        self.matcher = StopStrings(stop_strings)
        self.decode = decode
        self.window = 4 * max(len(stop) for stop in self.matcher.stops) + 4

    def __call__(self, tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        tails = tokens[:, -self.window:].tolist()
        return torch.tensor([self.ends_here(tail) for tail in tails], dtype=torch.bool, device=new_tokens.device)

    def ends_here(self, tail: list[int]) -> bool:
        before, now = self.decode(tail[:-1]), self.decode(tail)
        searched = len(os.path.commonprefix([before, now]))
        return self.matcher.find(now, new_from=searched) is not None
