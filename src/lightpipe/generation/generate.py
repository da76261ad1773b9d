"""Autoregressive generation: options validated up front, then prefill -> decode steps -> stop.

`generate(model, input_ids, config)` runs any model that offers the decoding protocol:

- `model.new_cache(rows, max_length, encoder_hidden=None) -> KVCache`: an empty cache for `rows`
  sequences (cross-attention keys/values computed here, once, for encoder-decoder models);
- `model.decode_step(tokens (rows, t), cache, *, last_only=False)` -> logits (rows, t or 1, V);
- optionally `model.max_positions`, the longest sequence its position embeddings allow;
- optionally `model.greedy_step(tokens, cache, positions=None)` -> (rows,) the argmax of decode_step's last logits
  (or (rows, positions) of the last `positions` positions), found without computing them all; plain greedy decoding
  (no processors, no scores kept) uses it;
- optionally `model.spare_rows()`: how many more rows than one a one-row decode step computes anyway; greedy
  decoding of one sequence fills them with tokens guessed by prompt lookup (lookup.py), checked for free;
- optionally `model.guesses_are_exact`: False where a pass's results depend on how many tokens it is fed, which
  rules prompt lookup out.

The first step (prefill) feeds the whole prompt; each later step feeds one token per row (greedy decoding of
one sequence also feeds the tokens prompt lookup guesses, and keeps those the model agrees with). A list of
logits processors shapes the scores, a strategy (greedy, sampling, beam search) picks the tokens, and
generation stops at max length or when every row has ended. Results equal transformers' `generate`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .. import checks
from ..config import known_keys, read_config_json, read_json_object
from ..errors import CheckpointError, InvalidInput
from . import processors as P
from . import stopping as S
from .lookup import PromptLookup
from .search import BeamSearch, Greedy, Sample

DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is given

# transformers' generation options lightpipe does not implement, with the value at which they do nothing.
UNSUPPORTED = {
    "top_h": None, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None,
    "constraints": None, "force_words_ids": None, "watermarking_config": None,
}
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
_warned: set = set()
logger = logging.getLogger(__name__)

_TOKEN_LISTS = ("suppress_tokens", "begin_suppress_tokens")


def _frozen(value: Any) -> Any:
    """JSON lists -> tuples and dicts -> read-only mappings, so a frozen config is really immutable."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Generation options, validated when built. Field names and defaults are transformers' GenerationConfig's.

    Lengths: max_new_tokens counts generated tokens; max_length counts the whole decoder sequence, prompt
    included (used when max_new_tokens is None; 20 new tokens when both are None). Keys of generation_config.json
    that are not options here (a model's own settings, such as language tables or special ids) are kept in `extra`.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int = 0
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0  # sampling: drop tokens less likely than this (0: off)
    eta_cutoff: float = 0.0  # sampling: drop tokens less likely than min(eta, sqrt(eta) * exp(-entropy)) (0: off)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    # {token ids: bias} added to the score of a sequence's last token when the tokens before it end the text so far;
    # transformers' list form [[ids, bias], ...] is taken too (generation_config.json has no tuple keys).
    sequence_bias: Mapping[tuple[int, ...], float] | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start after n new tokens, factor)
    renormalize_logits: bool = False  # scores -> log-probabilities after every processor
    stop_strings: str | tuple[str, ...] | None = None  # matched on the decoded text (generate needs a tokenizer)
    max_time: float | None = None  # seconds; every row stops once they have passed
    cache_implementation: str = "dynamic"  # "static": full-length cache reads, fixed shapes per step
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    forced_tokens: tuple[tuple[int, int], ...] | None = None  # (position in the sequence, token) pairs
    output_scores: bool = False
    # Greedy decoding of one sequence checks this many tokens guessed from the text itself per forward pass (prompt
    # lookup, lookup.py): the same tokens, fewer passes. None: as many as a step computes for free (see _guess_count);
    # 0: off.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None  # the longest n-gram prompt lookup matches (None: 2)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    # The options the source (generation_config.json) set explicitly, whatever their value: defaults of a pipeline
    # apply only to the others, as in transformers.
    set_options: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("suppress_tokens", "begin_suppress_tokens", "forced_tokens", "extra",
                     "bad_words_ids", "stop_strings"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "sequence_bias", _bias_mapping(self.sequence_bias))
        if isinstance(self.exponential_decay_length_penalty, list):
            object.__setattr__(self, "exponential_decay_length_penalty", tuple(self.exponential_decay_length_penalty))
        self._validate()

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "GenerationConfig":
        """generation_config.json's keys -> a config; null values take the default, unknown keys go to `extra`.
        Options of transformers that lightpipe does not implement are logged (once) when set to an active value."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra", "set_options"}
        known = {k: v for k, v in raw.items() if k in fields and v is not None}
        extra = {k: v for k, v in raw.items()
                 if k not in fields and not k.startswith("_") and k != "transformers_version"}
        ignored = sorted(k for k, inactive in UNSUPPORTED.items()
                         if raw.get(k) is not None and raw[k] != inactive)
        if ignored and tuple(ignored) not in _warned:
            _warned.add(tuple(ignored))
            logger.warning("generation options %s are not implemented by lightpipe and are ignored.",
                           ", ".join(ignored))
        return cls(**known, extra=extra, set_options=frozenset(known))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationConfig":
        """A checkpoint folder's generation_config.json; without one, the generation options that config.json
        holds (older checkpoints kept them there, and transformers falls back to them)."""
        path = Path(folder) / "generation_config.json"
        raw = read_json_object(path)
        if raw is None:
            path = Path(folder) / "config.json"
            options = {f.name for f in dataclasses.fields(cls)} | {"forced_decoder_ids"}
            raw = known_keys(read_config_json(Path(folder)), options)
        try:
            return cls.from_dict(raw)
        except InvalidInput as e:
            raise CheckpointError(f"{path} holds an invalid generation option: {e}") from e

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some options changed (validated). Unknown names are an error that lists the known ones."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise InvalidInput(f"unknown generation option(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(fields))}.")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def fill_token_id(self) -> int:
        """The token written after a sequence has ended: pad, else the first end token (as transformers)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in ("max_new_tokens", "max_length"):
            checks.positive_int(name, getattr(self, name), allow_none=True)
        checks.positive_int("min_new_tokens", self.min_new_tokens, allow_none=True, allow_zero=True)
        checks.positive_int("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, allow_none=True,
                            allow_zero=True)
        checks.positive_int("max_matching_ngram_size", self.max_matching_ngram_size, allow_none=True)
        checks.positive_int("top_k", self.top_k, allow_none=True, allow_zero=True)
        for name in ("min_length", "no_repeat_ngram_size"):
            checks.positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("num_beams", "num_return_sequences"):
            checks.positive_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "length_penalty", "epsilon_cutoff",
                     "eta_cutoff"):
            checks.number(name, getattr(self, name))
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be in [0, 1) (0: off), not {getattr(self, name)}.")
        checks.flag("renormalize_logits", self.renormalize_logits, allow_none=False)
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (isinstance(decay, tuple) and len(decay) == 2 and _is_token_id(decay[0])
                                      and isinstance(decay[1], (int, float)) and not isinstance(decay[1], bool)
                                      and decay[1] > 0):
            raise InvalidInput("exponential_decay_length_penalty must be (start, factor): the number of new tokens "
                               f"after which the end token's score grows, and a factor > 0; not {decay!r}.")
        checks.flag("do_sample", self.do_sample, allow_none=False)
        checks.probability("min_p", self.min_p, allow_none=True)
        checks.number("max_time", self.max_time, allow_none=True, positive=True, unit="seconds")
        if self.do_sample and not self.temperature > 0:
            raise InvalidInput(f"temperature must be > 0 when sampling, not {self.temperature}; "
                               "use do_sample=False for greedy decoding.")
        for name in ("top_p", "typical_p"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidInput(f"{name} must be in (0, 1], not {getattr(self, name)}.")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise InvalidInput(f"cache_implementation must be one of {', '.join(CACHE_IMPLEMENTATIONS)}, "
                               f"not {self.cache_implementation!r}.")
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
        if stops is not None and (not stops or not all(isinstance(x, str) and x for x in stops)):
            raise InvalidInput(f"stop_strings must be a non-empty string or a list of them, not {self.stop_strings!r}.")
        if self.bad_words_ids is not None and not (self.bad_words_ids and all(
                isinstance(seq, tuple) and seq and all(_is_token_id(i) for i in seq) for seq in self.bad_words_ids)):
            raise InvalidInput(f"bad_words_ids must be a non-empty list of non-empty token-id lists, "
                               f"not {self.bad_words_ids!r}.")
        if not self.repetition_penalty > 0:
            raise InvalidInput(f"repetition_penalty must be > 0, not {self.repetition_penalty}.")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidInput(f"early_stopping must be True, False or 'never', not {self.early_stopping!r}.")
        if self.num_return_sequences > 1:
            if self.num_beams == 1 and not self.do_sample:
                raise InvalidInput("num_return_sequences > 1 needs beam search (num_beams > 1) or sampling "
                                   "(do_sample=True): greedy decoding returns one sequence per input.")
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                raise InvalidInput(f"num_return_sequences ({self.num_return_sequences}) must not exceed "
                                   f"num_beams ({self.num_beams}).")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                     "forced_eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if value is not None and not all(_is_token_id(i) for i in ids):
                raise InvalidInput(f"{name} must be a token id (a non-negative integer), not {value!r}.")
        for name in _TOKEN_LISTS:
            value = getattr(self, name)
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise InvalidInput(f"{name} must be a list of token ids, not {value!r}.")
        pairs_ok = self.forced_tokens is None or all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
            for p in self.forced_tokens)
        if not pairs_ok:
            raise InvalidInput(f"forced_tokens must be a list of (int, int) pairs, not {self.forced_tokens!r}.")


def _bias_mapping(bias: Any) -> Mapping[tuple[int, ...], float] | None:
    """sequence_bias as a read-only {token-id tuple: float}, from a dict or transformers' [[ids, bias], ...] list."""
    if bias is None:
        return None
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    mapping = {}
    try:
        for ids, value in pairs:
            ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
            if not ids or not all(_is_token_id(i) for i in ids) or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError
            mapping[ids] = float(value)
    except (TypeError, ValueError):
        mapping = {}
    if not mapping:
        raise InvalidInput("sequence_bias must be a non-empty {(token ids...): bias} dict or a list of "
                           f"[[token ids], bias] pairs, not {bias!r}.")
    return MappingProxyType(mapping)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class GenerationOutput:
    """What `generate` returns. N = batch * num_return_sequences rows.

    sequences: (N, T) prompt + generated tokens; rows that ended early are filled with the pad token.
    scores: per generated step, the processed (rows, V) scores (greedy/sampling: one row per sequence; beam
        search: log-probabilities of the running beams, see beam_indices), when output_scores.
    sequences_scores: (N,) length-penalised log-probabilities of beam search hypotheses.
    beam_indices: (N, T - prompt_length) the row of `scores` that chose each generated token (-1 past the end).
    """

    sequences: torch.Tensor
    prompt_length: int
    scores: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    @property
    def generated(self) -> torch.Tensor:
        """(N, T - prompt_length) the generated tokens only."""
        return self.sequences[:, self.prompt_length:]


# The streaming hook: called after every step of greedy decoding or sampling with the (rows,) new tokens and a
# (rows,) boolean mask of the rows that were still running (the others received the pad token).
TokenCallback = Callable[[torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything decided before the first forward pass."""

    input_ids: torch.Tensor  # (B, P)
    padding: torch.Tensor | None  # (B,) left padding per row
    encoder_mask: torch.Tensor | None  # (B, S) real encoder tokens of a padded encoder batch, or None
    max_length: int
    processors: list
    criteria: list  # stopping criteria besides max length and end of sequence


def generate(model, input_ids, config: GenerationConfig, *, encoder_hidden: torch.Tensor | None = None,
             encoder_attention_mask: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, processors: Sequence[P.Processor] = (),
             stopping_criteria: Sequence[S.Criterion] = (), tokenizer=None,
             on_token: TokenCallback | None = None, generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate continuations of `input_ids` (B, P) - for encoder-decoder models the decoder prompt (e.g. the
    start token), with `encoder_hidden` (B, S, C) from `model.encode`.

    input_ids may also be a list of token-id lists; lists of different lengths are left-padded. attention_mask
    (B, P) marks real tokens with 1 and left padding with 0. encoder_attention_mask (B, S) marks the real tokens of
    a padded encoder batch (1) and its padding (0); the model's new_cache takes it as `encoder_mask`. `processors`
    are applied after the configured token rules and before the sampling warpers; `stopping_criteria` are added to
    the configured ones (max length, end of sequence, config.max_time, config.stop_strings - which needs
    `tokenizer`, anything with decode(ids));
    `on_token` streams tokens (not with beam search); `generator` seeds sampling.
    """
    device = next(model.parameters()).device
    plan = _plan(model, input_ids, attention_mask, config, encoder_hidden, encoder_attention_mask, processors,
                 stopping_criteria, tokenizer, on_token, device)
    with torch.inference_mode():
        if config.num_beams > 1:
            return _beam_search(model, plan, config, encoder_hidden, generator)
        guesses = _guess_count(model, plan, config, encoder_hidden)
        if guesses:
            return _greedy_with_lookup(model, plan, config, on_token, guesses)
        return _sample(model, plan, config, encoder_hidden, on_token, generator)


# ----------------------------------------------------------------------------------------------
# Validation before compute


def _plan(model, input_ids, attention_mask, config, encoder_hidden, encoder_mask, processors, stopping_criteria,
          tokenizer, on_token, device) -> _Plan:
    if not isinstance(config, GenerationConfig):
        raise InvalidInput(f"config must be a lightpipe GenerationConfig, not {type(config).__name__}.")
    input_ids, attention_mask = _as_prompt(input_ids, attention_mask, config, device)
    batch, prompt_length = input_ids.shape
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        raise InvalidInput(f"input_ids hold token ids outside the vocabulary [0, {vocab}).")
    biased = sorted({t for ids in config.sequence_bias or () for t in ids if vocab is not None and t >= vocab})
    if biased:
        raise InvalidInput(f"sequence_bias names token ids past the vocabulary ({vocab}): {biased}.")
    padding = None
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InvalidInput(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                               f"input_ids {tuple(input_ids.shape)}: they must match.")
        mask = attention_mask.to(device).bool()
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise InvalidInput("attention_mask must be left padding (0s, then 1s, last column all 1s): prompts are "
                               "padded on the left for generation.")
        padding = (~mask).sum(dim=1)
    if encoder_hidden is not None:
        if encoder_hidden.dim() != 3 or encoder_hidden.shape[0] != batch:
            raise InvalidInput(f"encoder_hidden must be (batch={batch}, S, C), not {tuple(encoder_hidden.shape)}.")
    if encoder_mask is not None:
        encoder_mask = torch.as_tensor(encoder_mask)
        if encoder_hidden is None or tuple(encoder_mask.shape) != tuple(encoder_hidden.shape[:2]):
            raise InvalidInput("encoder_attention_mask must be (batch, S), the shape of encoder_hidden's first two "
                               "dimensions.")
        encoder_mask = encoder_mask.to(device)
    if config.num_beams > 1 and on_token is not None:
        raise InvalidInput("token streaming (on_token) works with greedy decoding and sampling, not beam search: "
                           "use num_beams=1, or take the finished result.")
    P.check_processors(processors)
    max_length = _max_length(model, config, prompt_length)
    return _Plan(input_ids, padding, encoder_mask, max_length,
                 P.build_processors(config, prompt_length, max_length, processors, beams=config.num_beams > 1),
                 _criteria(config, stopping_criteria, tokenizer))


def _criteria(config: GenerationConfig, extra: Sequence[S.Criterion], tokenizer) -> list:
    """The stopping criteria besides max length and end of sequence, which the loops check themselves."""
    criteria = []
    if config.max_time is not None:
        criteria.append(S.MaxTime(config.max_time))
    if config.stop_strings is not None:
        if config.num_beams > 1:
            raise InvalidInput("stop_strings work with greedy decoding and sampling, not beam search (num_beams=1).")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise InvalidInput("stop_strings are matched on decoded text: pass the tokenizer to generate().")
        criteria.append(S.StopStringCriterion(config.stop_strings, tokenizer.decode))
    for criterion in extra:
        if not callable(criterion):
            raise InvalidInput(f"a stopping criterion must be callable as criterion(tokens, new_tokens), "
                               f"not {criterion!r}.")
        criteria.append(criterion)
    return criteria


def _as_prompt(input_ids, attention_mask, config, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(input_ids, (list, tuple)):
        rows = [list(r) for r in input_ids]
        if not rows or any(not r for r in rows):
            raise InvalidInput("input_ids must hold at least one token per row.")
        if not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r):
            raise InvalidInput("input_ids must be lists of integer token ids.")
        longest = max(map(len, rows))
        if attention_mask is None and any(len(r) != longest for r in rows):
            attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        rows = [[config.fill_token_id] * (longest - len(r)) + r for r in rows]
        input_ids = torch.tensor(rows, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InvalidInput("input_ids must be a (batch, length) tensor of token ids, or a list of token-id lists.")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InvalidInput(f"input_ids must hold integer token ids, not {input_ids.dtype}.")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    return input_ids.to(device=device, dtype=torch.long), attention_mask


def _max_length(model, config: GenerationConfig, prompt_length: int) -> int:
    limit = getattr(model, "max_positions", None)
    if config.max_new_tokens is not None:
        max_length = prompt_length + config.max_new_tokens
        if limit is not None and max_length > limit:
            raise InvalidInput(
                f"the prompt ({prompt_length} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the "
                f"{limit} positions this model can decode; ask for at most {limit - prompt_length} new tokens.")
    elif config.max_length is not None:
        max_length = config.max_length if limit is None else min(config.max_length, limit)
    else:
        max_length = prompt_length + DEFAULT_NEW_TOKENS
        max_length = max_length if limit is None else min(max_length, limit)
    if prompt_length >= max_length:
        raise InvalidInput(f"the prompt has {prompt_length} tokens, so max_length={max_length} leaves no room to "
                           "generate; set max_new_tokens instead.")
    return max_length


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling


def _new_cache(model, rows: int, plan: _Plan, config: GenerationConfig, encoder_hidden, repeat: int):
    options = {"static": True} if config.cache_implementation == "static" else {}
    if plan.encoder_mask is not None:
        options["encoder_mask"] = plan.encoder_mask
    cache = model.new_cache(rows, plan.max_length, encoder_hidden=encoder_hidden, **options)
    if plan.padding is not None:
        cache.set_left_padding(plan.padding.repeat_interleave(repeat))
    return cache


def _decode(model, tokens, cache) -> torch.Tensor:
    """One forward pass -> (rows, V) float32 scores of the next token."""
    return model.decode_step(tokens, cache, last_only=True)[:, -1].float()


def _argmax_only(model, plan: _Plan, config: GenerationConfig) -> bool:
    """Whether each step needs only the best token, which a model with `greedy_step` finds without computing every
    logit: greedy decoding with nothing that reads or changes the scores."""
    return (hasattr(model, "greedy_step") and not config.do_sample and not plan.processors
            and not config.output_scores)


def _sample(model, plan: _Plan, config: GenerationConfig, encoder_hidden, on_token, generator) -> GenerationOutput:
    """Greedy decoding or sampling. Rows that are done leave the batch (their cache rows are dropped), so they stop
    costing work - except with an encoder-decoder cache, whose rows share their input's encoder output; there, done
    rows keep running and receive the fill token."""
    repeat = config.num_return_sequences  # sampling several sequences per input
    prompt = plan.input_ids.repeat_interleave(repeat, dim=0)
    rows, prompt_length = prompt.shape
    device = prompt.device
    select = Sample(generator) if config.do_sample else Greedy()
    fill = config.fill_token_id
    criteria = ([S.EndOfSequence(config.eos_token_ids)] if config.eos_token_ids else []) + plan.criteria

    tokens = torch.full((rows, plan.max_length), fill, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = prompt
    cache = _new_cache(model, rows, plan, config, encoder_hidden, repeat)
    padding = None if plan.padding is None else plan.padding.repeat_interleave(repeat)
    drops_rows = cache.can_drop_rows
    running = torch.ones(rows, dtype=torch.bool, device=device)
    active: torch.Tensor | None = None  # rows the cache holds, in its order; None = all rows
    all_scores = []
    length, step_input = prompt_length, prompt
    argmax_only = _argmax_only(model, plan, config)
    while True:
        if argmax_only:
            chosen = model.greedy_step(step_input, cache)  # (rows in the cache,)
        else:
            scores = _decode(model, step_input, cache)  # (rows in the cache, V)
            history = tokens[:, :length] if active is None else tokens[active, :length]
            scores = P.apply(plan.processors, history, scores,
                             padding if padding is None or active is None else padding[active])
            if config.output_scores:
                all_scores.append(scores if active is None else
                                  scores.new_full((rows, scores.shape[1]), -math.inf).index_copy_(0, active, scores))
            chosen = select(scores)
        if active is None:
            chosen = torch.where(running, chosen, fill) if criteria else chosen
            tokens[:, length] = chosen
            done = S.any_done(criteria, tokens[:, :length + 1], chosen) & running
        else:
            tokens[active, length] = chosen
            done = S.any_done(criteria, tokens[active, :length + 1], chosen)
        length += 1
        if on_token is not None:
            on_token(tokens[:, length - 1].clone(), running.clone())
        if active is None:
            running &= ~done
        else:
            running[active[done]] = False
        if length >= plan.max_length or not bool(running.any()):
            break
        if drops_rows and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.reorder(keep)
            active = keep if active is None else active[keep]
        step_input = tokens[:, length - 1:length] if active is None else tokens[active, length - 1:length]
    return GenerationOutput(
        sequences=tokens[:, :length], prompt_length=prompt_length,
        scores=tuple(all_scores) if config.output_scores else None,
    )


def _guess_count(model, plan: _Plan, config: GenerationConfig, encoder_hidden) -> int:
    """How many guessed tokens each forward pass of greedy decoding checks (0: none): prompt_lookup_num_tokens when
    set, else the rows a one-row step computes anyway (`model.spare_rows()`). Only for one decoder-only sequence
    (transformers' prompt lookup takes one too) of a model whose passes are exact whatever they are fed; sampling
    keeps to plain steps, as its draws must not change."""
    if (config.do_sample or plan.input_ids.shape[0] != 1 or encoder_hidden is not None
            or not getattr(model, "guesses_are_exact", True)):
        return 0
    if config.prompt_lookup_num_tokens is not None:
        return config.prompt_lookup_num_tokens
    spare_rows = getattr(model, "spare_rows", None)
    return spare_rows() if callable(spare_rows) else 0


def _greedy_with_lookup(model, plan: _Plan, config: GenerationConfig, on_token, count: int) -> GenerationOutput:
    """Greedy decoding of one sequence in which every forward pass after the prompt's also checks up to `count`
    tokens guessed by prompt lookup: it keeps the guesses up to the first the model would not have chosen, then
    the model's own choice, and drops the rejected guesses' cache slots. The tokens (and scores) are _sample's
    greedy ones, in fewer passes when the text repeats itself."""
    prompt = plan.input_ids  # (1, P)
    prompt_length, device = prompt.shape[1], prompt.device
    criteria = ([S.EndOfSequence(config.eos_token_ids)] if config.eos_token_ids else []) + plan.criteria
    tokens = torch.full((1, plan.max_length), config.fill_token_id, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = prompt
    cache = _new_cache(model, 1, plan, config, None, 1)
    lookup = PromptLookup(prompt[0, 0 if plan.padding is None else int(plan.padding[0]):].tolist(),
                          config.max_matching_ngram_size or 2)
    argmax_only, select = _argmax_only(model, plan, config), Greedy()
    running = torch.ones(1, dtype=torch.bool, device=device)
    all_scores = []
    length, fed = prompt_length, prompt
    while True:
        # Each pass yields at least one token, so at most max_length - length - 1 guesses can be used.
        guesses = lookup.guess(min(count, plan.max_length - length - 1)) if length > prompt_length else []
        if guesses:
            fed = torch.cat([fed, torch.tensor([guesses], dtype=torch.long, device=device)], dim=1)
        positions = len(guesses) + 1
        if argmax_only:
            choices = model.greedy_step(fed, cache, positions=positions)[0]  # (positions,)
        else:
            logits = model.decode_step(fed, cache, last_only=positions == 1)[0, -positions:].float()  # (positions, V)
        for i in range(positions):
            if argmax_only:
                token = choices[i:i + 1]
            else:
                scores = P.apply(plan.processors, tokens[:, :length], logits[i:i + 1], plan.padding)
                if config.output_scores:
                    all_scores.append(scores)
                token = select(scores)
            tokens[:, length] = token
            length += 1
            done = bool(S.any_done(criteria, tokens[:, :length], token)[0])
            if on_token is not None:
                on_token(tokens[:, length - 1].clone(), running.clone())
            if done or length >= plan.max_length:
                return GenerationOutput(sequences=tokens[:, :length], prompt_length=prompt_length,
                                        scores=tuple(all_scores) if config.output_scores else None)
            lookup.extend([int(token)])
            if i == len(guesses) or guesses[i] != int(token):
                break
        cache.crop(cache.length - (len(guesses) - i))  # the slots of the guesses after the i accepted ones
        fed = tokens[:, length - 1:length]


# ----------------------------------------------------------------------------------------------
# Beam search


def _beam_search(model, plan: _Plan, config: GenerationConfig, encoder_hidden, generator) -> GenerationOutput:
    beams = config.num_beams
    prompt = plan.input_ids.repeat_interleave(beams, dim=0)  # (B*N, P), the beams of one input adjacent
    rows, prompt_length = prompt.shape
    search = BeamSearch(prompt, plan.input_ids.shape[0], beams, plan.max_length, config.eos_token_ids,
                        config.fill_token_id, config.length_penalty, config.early_stopping, config.do_sample,
                        generator)
    cache = _new_cache(model, rows, plan, config, encoder_hidden, beams)
    # A beam keeps its input's left padding: reordering moves rows only among the beams of one input.
    padding = None if plan.padding is None else plan.padding.repeat_interleave(beams)
    all_scores = []
    step_input = prompt
    while True:
        logits = _decode(model, step_input, cache)
        log_probs = P.apply(plan.processors, search.tokens(), logits.log_softmax(dim=-1), padding)
        if config.output_scores:
            all_scores.append(log_probs)
        parents = search.step(log_probs)
        if search.finished or _out_of_time(plan.criteria, search):
            break
        cache.reorder(parents)
        step_input = search.tokens()[:, -1:]
    sequences, sequence_scores, beam_indices = search.result(config.num_return_sequences)
    return GenerationOutput(
        sequences=sequences, prompt_length=prompt_length,
        scores=tuple(all_scores) if config.output_scores else None,
        sequences_scores=sequence_scores, beam_indices=beam_indices,
    )


def _out_of_time(criteria: list, search: BeamSearch) -> bool:
    """Whether a row-independent criterion (max_time, the caller's) ends the beam search now."""
    if not criteria:
        return False
    tokens = search.tokens()
    return bool(S.any_done(criteria, tokens, tokens[:, -1]).all())
