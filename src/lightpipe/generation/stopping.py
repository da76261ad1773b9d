"""Stopping criteria: small callables that say which rows are done after a decoding step.

Each criterion is `criterion(tokens, new_tokens) -> (rows,) bool`, with tokens the (rows, length) sequences so far
(the prompt included, the new tokens last) and new_tokens the (rows,) tokens just chosen; a row stops as soon as any
criterion of the list says so (`any_done`). Rows are the running rows only: rows that stopped before are not shown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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


class StopStrings:
    """A row is done when its generated text contains one of `stop_strings`, wherever token boundaries fall.

    `decode(ids) -> str` turns token ids into text (the tokenizer's decode, special tokens kept so that a stop
    string can never match across a hidden token). Only the generated part of a row (from `prompt_length`) is
    searched, and only its tail: a stop string that was not in the text before this step must end in the newest
    token's text, so the last `longest + len(newest text)` characters are enough.
    """

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str], prompt_length: int):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise InvalidInput(f"stop_strings must be a non-empty string or a list of them, not {stop_strings!r}.")
        self.stop_strings = list(stop_strings)
        self.decode = decode
        self.prompt_length = prompt_length

    def __call__(self, tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        generated = tokens[:, self.prompt_length:].tolist()
        return torch.tensor([self.matches(row) for row in generated], dtype=torch.bool, device=new_tokens.device)

    def matches(self, generated: list[int]) -> bool:
        text = self.decode(generated)
        return any(s in text for s in self.stop_strings)

    def cut(self, text: str) -> str:
        """text up to and including the first stop string in it (all of it when none is)."""
        ends = [text.find(s) + len(s) for s in self.stop_strings if s in text]
        return text[:min(ends)] if ends else text
