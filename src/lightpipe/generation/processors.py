"""Logits processors: small callables that reshape next-token scores before a token is chosen.

Each one is `processor(input_ids, scores) -> scores`, with input_ids the (rows, length) tokens so far
(prompt included) and scores the (rows, vocab) float scores of the next token: raw logits for greedy
decoding and sampling, log-probabilities for beam search. A list is applied in order by `apply`;
`build_processors` assembles the list a `GenerationConfig` asks for, in the order transformers uses
(so results match it): penalties and length rules, forced and suppressed tokens, the caller's own
processors (e.g. a speech model's timestamp rules), then the sampling warpers (temperature, top-k, top-p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInput

if TYPE_CHECKING:
    from .generate import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = -math.inf


def apply(processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor,
          padding: torch.Tensor | None = None) -> torch.Tensor:
    """Apply `processors` in order. padding (rows,) counts each row's left padding in input_ids; processors that
    must not read padded positions (`reads_padding = True`) get it as a third argument."""
    for processor in processors:
        if getattr(processor, "reads_padding", False):
            scores = processor(input_ids, scores, padding)
        else:
            scores = processor(input_ids, scores)
    return scores


class _VocabMask:
    """A (vocab,) boolean mask over token ids, built once per vocabulary size and device."""

    def __init__(self, token_ids: Iterable[int]):
        self.token_ids = sorted({int(t) for t in token_ids})
        self._mask: torch.Tensor | None = None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            ids = [t for t in self.token_ids if 0 <= t < scores.shape[-1]]  # ids past the vocabulary mask nothing
            mask[ids] = True
            self._mask = mask
        return self._mask


# ----------------------------------------------------------------------------------------------
# Token rules


class SuppressTokens:
    """Never choose these tokens."""

    def __init__(self, token_ids: Iterable[int]):
        self.tokens = _VocabMask(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.tokens.mask(scores), NEG_INF)


class SuppressTokensAtBegin:
    """Do not choose these tokens as the first generated one (when the sequence has `begin_index` tokens)."""

    def __init__(self, token_ids: Iterable[int], begin_index: int):
        self.tokens = _VocabMask(token_ids)
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.begin_index:
            return scores
        return scores.masked_fill(self.tokens.mask(scores), NEG_INF)


class ForcedTokens:
    """Force token `token` when the sequence (prompt included) has exactly `position` tokens."""

    def __init__(self, forced: dict[int, int] | Iterable[tuple[int, int]]):
        self.forced = dict(forced)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.forced.get(input_ids.shape[-1])
        if token is None:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, token] = 0.0
        return forced


class ForcedFirstToken:
    """Force `token` as the first generated token of a decoder started from one token (BART's forced_bos)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != 1:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.token] = 0.0
        return forced


class ForcedLastToken:
    """Force an end token as the last token when the sequence reaches `max_length` (forced_eos)."""

    def __init__(self, max_length: int, eos_token_ids: Iterable[int]):
        self.max_length = max_length
        self.eos = list(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.eos] = 0.0
        return forced


class NoRepeatNGram:
    """Forbid any token that would repeat an n-gram already in the sequence (prompt included)."""

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length, n = input_ids.shape[-1], self.n
        if length < n:
            return scores
        # An n-gram is completed by the next token only if its first n - 1 tokens equal the current suffix.
        suffix = input_ids[:, length - n + 1:]  # (rows, n - 1)
        windows = input_ids.unfold(1, n, 1)  # (rows, length - n + 1, n)
        repeats = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (rows, windows)
        vocab = scores.shape[-1]
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        # Windows that do not repeat write to a spare column past the vocabulary.
        banned.scatter_(1, torch.where(repeats, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], NEG_INF)


class BadWords:
    """Forbid token sequences: the last token of each banned sequence is impossible when the tokens before it
    end the sequence so far (single-token sequences are always impossible). Banned sequences that are a lone
    end-of-sequence token are ignored, so generation can always end (as transformers does)."""

    def __init__(self, bad_words_ids: Iterable[Iterable[int]], eos_token_ids: Iterable[int] = ()):
        eos = {(e,) for e in eos_token_ids}
        self.sequences = [tuple(s) for s in bad_words_ids if tuple(s) not in eos]
        self.single = [s[0] for s in self.sequences if len(s) == 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros_like(scores, dtype=torch.bool)
        if self.single:
            banned[:, self.single] = True
        length = input_ids.shape[1]
        for sequence in self.sequences:
            prefix = len(sequence) - 1
            if not prefix or prefix > length:
                continue
            matches = (input_ids[:, length - prefix:] == input_ids.new_tensor(sequence[:-1])).all(dim=1)  # (rows,)
            banned[:, sequence[-1]] |= matches
        return scores.masked_fill(banned, NEG_INF)


class MinLength:
    """Forbid end-of-sequence tokens while the sequence (prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_ids: Iterable[int]):
        self.min_length = min_length
        self.eos = _VocabMask(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores
        return scores.masked_fill(self.eos.mask(scores), NEG_INF)


class RepetitionPenalty:
    """Make tokens already in the sequence less likely: positive scores divided by `penalty`, negative ones
    multiplied (the CTRL rule, as transformers applies it, prompt included). A row's left padding is not part of
    its sequence: a batched prompt gets the penalty it gets alone (transformers skips padding the same way)."""

    reads_padding = True

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor,
                 padding: torch.Tensor | None = None) -> torch.Tensor:
        vocab = scores.shape[-1]
        if padding is not None and bool(padding.any()):
            # Padded positions point at a spare column past the vocabulary, dropped after the scatter.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < padding[:, None], vocab)
            scores = torch.nn.functional.pad(scores, (0, 1))
        seen = scores.gather(1, input_ids)  # (rows, length)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)[:, :vocab]


class SequenceBias:
    """Add a bias to the score of the last token of each biased sequence when the tokens before it end the sequence
    so far (a one-token sequence is biased at every step); several matching sequences add up."""

    def __init__(self, bias: Mapping[tuple[int, ...], float]):
        self.single = {ids[0]: b for ids, b in bias.items() if len(ids) == 1}
        self.longer = [(ids, b) for ids, b in bias.items() if len(ids) > 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        if self.single:
            bias[:, list(self.single)] = scores.new_tensor(list(self.single.values()))
        length = input_ids.shape[1]
        for ids, value in self.longer:
            prefix = len(ids) - 1
            if prefix > length:
                continue
            matches = (input_ids[:, length - prefix:] == input_ids.new_tensor(ids[:-1])).all(dim=1)  # (rows,)
            bias[:, ids[-1]] += matches.to(scores.dtype) * value
        return scores + bias


class ExponentialDecayLengthPenalty:
    """After `start` tokens past the prompt, raise the end tokens' scores by |score| * (factor ** n - 1) at the n-th
    step beyond it, so long generations become ever likelier to end."""

    def __init__(self, start: int, factor: float, prompt_length: int, eos_token_ids: Iterable[int]):
        self.begin = prompt_length + start
        self.factor = factor
        self.eos = list(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps = input_ids.shape[-1] - self.begin
        if steps <= 0 or not self.eos:
            return scores
        end = scores[:, self.eos]
        raised = end.abs() * (self.factor ** steps - 1)
        scores = scores.clone()
        scores[:, self.eos] = end + torch.where(torch.isfinite(end), raised, torch.zeros_like(raised))
        return scores


class LogNormalize:
    """Scores -> log-probabilities (renormalize_logits): what the processors left, summing to one again."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.log_softmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Sampling warpers


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k best tokens (at least `min_tokens_to_keep`)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, k).values[..., -1:]  # (rows, 1)
        return scores.masked_fill(scores < kth_best, NEG_INF)


class TopP:
    """Keep the smallest set of best tokens whose probabilities add up to more than `top_p` (nucleus)."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p = top_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - self.top_p)  # the unlikely tail, which holds at most 1 - top_p
        drop[..., -self.min_tokens_to_keep:] = False
        return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


class MinP:
    """Keep the tokens whose probability is at least `min_p` times the best token's (at least `min_tokens_to_keep`)."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p = min_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        best = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        return scores.masked_fill(drop.scatter(1, best, False), NEG_INF)


class TypicalP:
    """Locally typical sampling: keep the tokens whose surprise is closest to the distribution's entropy, until their
    probabilities add up to `mass` (the first token that reaches it is kept)."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1):
        self.mass = mass
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.log_softmax(dim=-1)
        entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # (rows, 1)
        distance, order = torch.sort((-log_probs - entropy).abs(), descending=False)  # most typical first
        cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)  # (rows,) last kept rank
        drop = distance > distance.gather(1, last[:, None])
        drop[..., :self.min_tokens_to_keep] = False
        return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


class EpsilonCutoff:
    """Drop tokens whose probability is below `epsilon` (truncation sampling), keeping the best `min_tokens_to_keep`."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        self.epsilon = epsilon
        self.min_tokens_to_keep = min_tokens_to_keep

    def _cut(self, scores: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
        drop = scores.softmax(dim=-1) < threshold
        kth_best = torch.topk(scores, min(self.min_tokens_to_keep, scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(drop & (scores < kth_best), NEG_INF)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._cut(scores, self.epsilon)


class EtaCutoff(EpsilonCutoff):
    """Epsilon cutoff with a threshold that falls as the distribution's entropy grows: min(eta, sqrt(eta) * e^-H)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        entropy = torch.special.entr(scores.softmax(dim=-1)).sum(dim=-1, keepdim=True)  # (rows, 1), 0 log 0 = 0
        threshold = torch.clamp(math.sqrt(self.epsilon) * torch.exp(-entropy), max=self.epsilon)
        return self._cut(scores, threshold)


# ----------------------------------------------------------------------------------------------
# Assembly


def build_processors(config: "GenerationConfig", prompt_length: int, max_length: int,
                     extra: Sequence[Processor] = (), beams: bool = False) -> list[Processor]:
    """The processors `config` asks for, around the caller's `extra` ones, in transformers' order.

    prompt_length is the length of the prompt given to the decoder (the position of the first generated token);
    max_length the length at which generation stops.
    """
    processors: list[Processor] = []
    eos = config.eos_token_ids
    if config.sequence_bias:
        processors.append(SequenceBias(config.sequence_bias))
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        processors.append(BadWords(config.bad_words_ids, eos))
    min_length = config.min_length
    if config.min_new_tokens is not None:
        min_length = prompt_length + config.min_new_tokens
    if min_length and eos:
        processors.append(MinLength(min_length, eos))
    if config.forced_bos_token_id is not None:
        processors.append(ForcedFirstToken(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        forced_eos = config.forced_eos_token_id
        processors.append(ForcedLastToken(max_length, [forced_eos] if isinstance(forced_eos, int) else forced_eos))
    if config.exponential_decay_length_penalty is not None:
        start, factor = config.exponential_decay_length_penalty
        processors.append(ExponentialDecayLengthPenalty(start, factor, prompt_length, eos))
    if config.forced_tokens:
        processors.append(ForcedTokens(config.forced_tokens))
    if config.suppress_tokens:
        processors.append(SuppressTokens(config.suppress_tokens))
    if config.begin_suppress_tokens:
        # With a forced first token after a one-token prompt, "the beginning" is the token after it.
        begin = prompt_length + 1 if prompt_length == 1 and config.forced_bos_token_id is not None else prompt_length
        processors.append(SuppressTokensAtBegin(config.begin_suppress_tokens, begin))
    processors.extend(extra)
    if config.do_sample:
        # Beam sampling keeps one token more than there are end tokens, so a beam can always go on.
        keep = len(eos) + 1 if beams else 1
        if config.temperature != 1.0:
            processors.append(Temperature(config.temperature))
        if config.top_k:
            processors.append(TopK(config.top_k, keep))
        if config.top_p < 1.0:
            processors.append(TopP(config.top_p, keep))
        if config.min_p is not None:
            processors.append(MinP(config.min_p, keep))
        if config.typical_p < 1.0:
            processors.append(TypicalP(config.typical_p, keep))
        if config.epsilon_cutoff > 0:
            processors.append(EpsilonCutoff(config.epsilon_cutoff, keep))
        if config.eta_cutoff > 0:
            processors.append(EtaCutoff(config.eta_cutoff, keep))
    if config.renormalize_logits:
        processors.append(LogNormalize())
    return processors


def check_processors(processors: Sequence[Processor]) -> None:
    for p in processors:
        if not callable(p):
            raise InvalidInput(f"a logits processor must be callable as processor(input_ids, scores), not {p!r}.")
