"""Prompt lookup: guess the next tokens of a sequence from where its last few tokens occurred before.

Greedy decoding of one sequence can check several guessed tokens in one forward pass: feed the last token and the
guesses, take the model's choice at every position, and keep the guesses up to the first one the model would not
have chosen, plus the model's own choice after them. The tokens are exactly greedy decoding's; a pass whose guesses
are all wrong still yields one token. transformers calls this prompt lookup decoding (`prompt_lookup_num_tokens`).

The guesses come from the text itself: if the last n tokens (n = max_matching_ngram_size down to 1) occurred
before, the tokens that followed that occurrence are guessed to follow again. The most recent occurrence is taken
(transformers takes the first): a sequence that has fallen into a loop repeats its latest period. When fewer
tokens follow the occurrence than wanted, the guess goes on around that period (the occurrence's continuation up
to now, repeated), so a run of one token guesses more of it.
"""

from __future__ import annotations


class PromptLookup:
    """An index of a growing token sequence's n-grams (n = 1..ngram_size): each maps to the position just after
    its latest occurrence that has a token after it."""

    def __init__(self, tokens: list[int], ngram_size: int):
        self.tokens: list[int] = []
        self.ngram_size = ngram_size
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram_size)]
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            # The n-grams that end at the current last token now have a token after them.
            end = len(self.tokens)
            for n in range(1, min(self.ngram_size, end) + 1):
                self._after[n - 1][tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def guess(self, count: int) -> list[int]:
        """Up to `count` tokens that may follow the sequence: [] when its last tokens never occurred before."""
        if count <= 0:
            return []
        end = len(self.tokens)
        for n in range(min(self.ngram_size, end), 0, -1):
            start = self._after[n - 1].get(tuple(self.tokens[end - n:end]))
            if start is not None:
                period = self.tokens[start:end]
                return [period[i % len(period)] for i in range(count)]
        return []
