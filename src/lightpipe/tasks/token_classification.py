"""token-classification (alias ner): a text -> one label per token, or entities grouped from them.

Each token gets a softmax over the model's labels. With `aggregation_strategy="none"` every token
is returned (`entity`, `score`, `index`, `word`, `start`, `end`); the other strategies join tokens
into entities (`entity_group`, `score`, `word`, `start`, `end`):

- simple: adjacent tokens with the same tag are joined (a `B-` tag starts a new entity);
- first / average / max: the sub-word tokens of one word are first forced to agree, on the label
  of the word's first token, on the label of the averaged scores, or on the label of the token
  with the highest score; then words are joined as in simple.

Labels in `ignore_labels` (default ["O"]) are dropped from the result. A text longer than the
model is cut to fit, unless `stride` is given: then it is split into overlapping windows, and
entities found twice in the overlap are reduced to one.
"""

from __future__ import annotations

import enum
import logging
import warnings
from typing import Any

import numpy as np

from ..checks import flag, positive_int
from ..errors import InvalidInput
from ..runtime import ModelItem
from .base import TextPipeline

logger = logging.getLogger(__name__)


class AggregationStrategy(str, enum.Enum):
    """The ways tokens are joined into entities; a plain string of the same name works as well."""

    NONE = "none"
    SIMPLE = "simple"
    FIRST = "first"
    AVERAGE = "average"
    MAX = "max"


STRATEGIES = tuple(s.value for s in AggregationStrategy)
WORD_STRATEGIES = ("first", "average", "max")  # strategies that make the tokens of one word agree


def parse_strategy(value: Any) -> str:
    """None, a strategy name in any case, or an enum member (ours or transformers') -> its lower-case name."""
    if value is None:
        return "none"
    name = value.value if isinstance(value, enum.Enum) else value
    if isinstance(name, str) and name.lower() in STRATEGIES:
        return name.lower()
    raise InvalidInput(f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, not {value!r}.")


class _WithOffsets:
    """One input paired with the offset mapping its caller gave for it."""

    __slots__ = ("value", "mapping")

    def __init__(self, value: Any, mapping: list[tuple[int, int]]):
        self.value = value
        self.mapping = mapping


def _is_pair(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """(T, labels) -> probabilities, shifted by each row's maximum for stability."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def split_tag(label) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'I-PER' -> ('I', 'PER'); a label without a prefix continues: ('I', label).
    A label that is not text (config.json may name labels by numbers) is read as its text."""
    label = str(label)
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def merge_overlapping(entities: list[dict]) -> list[dict]:
    """Entities from overlapping windows -> one per overlap: the longer wins, then the higher score."""
    if not entities:
        return entities
    ordered = sorted(entities, key=lambda e: e["start"])
    merged = []
    kept = ordered[0]
    for entity in ordered:
        if kept["start"] <= entity["start"] < kept["end"]:
            length, kept_length = entity["end"] - entity["start"], kept["end"] - kept["start"]
            if length > kept_length or (length == kept_length and entity["score"] > kept["score"]):
                kept = entity
        else:
            merged.append(kept)
            kept = entity
    merged.append(kept)
    return merged


class TokenClassificationPipeline(TextPipeline):
    task = "token-classification"
    preprocess_params = ("stride", "is_split_into_words", "delimiter")
    postprocess_params = ("aggregation_strategy", "ignore_labels")
    sequence_outputs = ("logits",)

    def __init__(self, *args, **kwargs):
        self._warned: set[str] = set()
        super().__init__(*args, **kwargs)

    @property
    def accepted_params(self) -> tuple[str, ...]:
        # offset_mapping belongs to each input, so __call__ pairs it with the inputs rather than routing it.
        return super().accepted_params + ("offset_mapping",)

    def _checked(self, params: dict[str, Any], drop_none: bool = False) -> dict[str, Any]:
        # transformers' old spellings, mapped in place (so that a call's later routing sees the mapping too):
        # grouped_entities / ignore_subwords -> aggregation_strategy "simple" / "first" / "none".
        if "grouped_entities" in params or "ignore_subwords" in params:
            grouped = flag("grouped_entities", params.pop("grouped_entities", None))
            ignore_subwords = flag("ignore_subwords", params.pop("ignore_subwords", None))
            strategy = ("first" if ignore_subwords else "simple") if grouped else "none"
            warnings.warn(f'grouped_entities and ignore_subwords are deprecated: use aggregation_strategy="{strategy}".',
                          FutureWarning, stacklevel=4)
            params["aggregation_strategy"] = strategy
        return super()._checked(params, drop_none)

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        strategy = parse_strategy(params.get("aggregation_strategy"))
        labels = params.get("ignore_labels")
        if labels is not None and not isinstance(labels, str) and (
                not isinstance(labels, (list, tuple, set, frozenset)) or not all(isinstance(l, str) for l in labels)):
            raise InvalidInput(f"ignore_labels must be a list of label names, not {labels!r}.")
        stride = params.get("stride")
        if stride is not None:
            positive_int("stride", stride, allow_zero=True)
            room = self.max_positions - self.tokenizer.num_special_tokens_to_add(False)
            if stride >= room:
                raise InvalidInput(f"stride={stride} must be smaller than the {room} text tokens one window holds "
                                   f"(the model takes {self.max_positions} tokens, special tokens included).")
            if "aggregation_strategy" in params and strategy == "none":
                raise InvalidInput('stride splits the text into overlapping windows, which needs aggregation_strategy '
                                   '"simple", "first", "average" or "max", not "none".')
        flag("is_split_into_words", params.get("is_split_into_words"))
        delimiter = params.get("delimiter")
        if delimiter is not None and not isinstance(delimiter, str):
            raise InvalidInput(f"delimiter must be a string, not {delimiter!r}.")

    # ------------------------------------------------------------------ calling
    def __call__(self, inputs, **params):
        mapping = params.pop("offset_mapping", None)
        self._checked(params)  # every parameter error before any pairing of inputs
        if mapping is None:
            mapping = self._defaults.get("offset_mapping")
        split = params.get("is_split_into_words", self._defaults.get("is_split_into_words")) or False
        # A list of words is one pre-split input; transformers answers it with a list of one result.
        one_split = (split and isinstance(inputs, (list, tuple))
                     and not all(isinstance(x, (list, tuple)) for x in inputs))
        batch = [inputs] if one_split else inputs
        if mapping is not None:
            if self._is_stream(batch):
                raise InvalidInput("offset_mapping cannot be given with a stream of inputs; pass a list.")
            if params.get("stride", self._defaults.get("stride")) is not None:
                raise InvalidInput("offset_mapping describes the tokens of one window; "
                                   "it cannot be combined with stride.")
            single = self.is_single(batch)
            batch = self._pair_offsets([batch] if single else list(batch), mapping)
            if single:
                batch = batch[0]
        return super().__call__(batch, **params)

    @staticmethod
    def _pair_offsets(inputs: list, mapping: Any) -> list[_WithOffsets]:
        if not isinstance(mapping, (list, tuple)) or not mapping:
            raise InvalidInput("offset_mapping must be a list of (start, end) pairs, one per token.")
        mappings = [mapping] if _is_pair(mapping[0]) else list(mapping)
        if len(mappings) != len(inputs):
            raise InvalidInput(f"offset_mapping holds {len(mappings)} mapping(s) for {len(inputs)} input(s); "
                               "give one list of (start, end) pairs per input.")
        for m in mappings:
            if not isinstance(m, (list, tuple)) or not all(_is_pair(p) for p in m):
                raise InvalidInput("offset_mapping must be a list of (start, end) integer pairs, one per token.")
        return [_WithOffsets(x, [tuple(p) for p in m]) for x, m in zip(inputs, mappings)]

    # ------------------------------------------------------------------ preprocess
    @staticmethod
    def _check_words(value: Any) -> list[str]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
            raise InvalidInput("with is_split_into_words=True each input must be a list of words (strings).")
        if not any(w.strip() for w in value):
            raise InvalidInput("the list of words is empty: give some words.")
        return list(value)

    def preprocess(self, inputs, stride=None, is_split_into_words=False, delimiter=None):
        given_offsets = None
        if isinstance(inputs, _WithOffsets):
            inputs, given_offsets = inputs.value, inputs.mapping
        word_starts = None
        if is_split_into_words:
            words = self._check_words(inputs)
            delimiter = " " if delimiter is None else delimiter
            sentence = delimiter.join(words)  # the text starts and ends point into
            word_starts, position = [], 0
            for word in words:
                word_starts.append(position)
                position += len(word) + len(delimiter)
            text = words
        else:
            sentence = text = self.check_text(inputs, allow_empty=True)

        limit = self.max_positions
        if stride is None:
            encoding = self.tokenizer.encode(text, is_split_into_words=is_split_into_words)
            if len(encoding.ids) > limit:
                self._warn_once("truncated", "an input of %d tokens was cut to the model's %d; pass stride= to "
                                "classify the whole text in overlapping windows.", len(encoding.ids), limit)
                encoding = self.tokenizer.encode(text, truncation=True, max_length=limit,
                                                 is_split_into_words=is_split_into_words)
            windows = [encoding]
        else:
            encoding = self.tokenizer.encode(text, truncation=True, max_length=limit, stride=stride,
                                             is_split_into_words=is_split_into_words)
            windows = [encoding, *encoding.overflowing]

        items = []
        for window in windows:
            offsets = given_offsets if given_offsets is not None else window.offsets
            if len(offsets) < len(window.ids):
                raise InvalidInput(f"offset_mapping has {len(offsets)} pairs but the input has {len(window.ids)} "
                                   "tokens (special tokens included).")
            meta = {
                "sentence": sentence,
                "ids": list(window.ids),
                "offsets": list(offsets),
                "special": list(window.special_tokens_mask),
                "word_ids": list(window.word_ids) if word_starts is not None else None,
                "word_starts": word_starts,
            }
            items.append(ModelItem(self.features(window), meta))
        return items

    # ------------------------------------------------------------------ forward
    def forward(self, batch):
        return {"logits": self.model(**batch)["logits"]}

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, outputs, metas, aggregation_strategy=None, ignore_labels=None):
        strategy = parse_strategy(aggregation_strategy)
        if ignore_labels is None:
            ignore = {"O"}
        else:
            ignore = {ignore_labels} if isinstance(ignore_labels, str) else set(ignore_labels)
        sentence = metas[0]["sentence"]
        entities: list[dict] = []
        for out, meta in zip(outputs, metas):
            scores = _softmax(out["logits"].float().numpy())  # (T, labels)
            tokens = self._tokens(sentence, meta, scores, strategy)
            for entity in self._aggregate(tokens, strategy):
                if entity.get("entity", entity.get("entity_group")) not in ignore:
                    entities.append(entity)
        if len(outputs) > 1:
            entities = merge_overlapping(entities)
        for entity in entities:
            entity["score"] = float(entity["score"])
        return entities

    def _word_aware(self) -> bool:
        """Whether the tokenizer marks word continuations (WordPiece's "##"), so sub-words are known exactly."""
        return bool(getattr(self.tokenizer.backend.model, "continuing_subword_prefix", None))

    def _tokens(self, sentence: str, meta: dict, scores: np.ndarray, strategy: str) -> list[dict]:
        """The non-special tokens of one window, with their scores, text span and whether they continue a word."""
        word_aware = self._word_aware()
        if not word_aware and strategy in WORD_STRATEGIES:
            self._warn_once("heuristic", "this tokenizer does not mark sub-words; aggregation_strategy=%r guesses "
                            "word boundaries from spaces in the text.", strategy)
        unk_id = self.tokenizer.unk_token_id
        word_ids, word_starts = meta["word_ids"], meta["word_starts"]
        tokens = []
        for index, token_scores in enumerate(scores):
            if meta["special"][index]:
                continue
            token_id = meta["ids"][index]
            word = self.tokenizer.id_to_token(token_id)
            start, end = (int(v) for v in meta["offsets"][index])
            if word_starts is not None and word_ids[index] is not None:  # offsets are within each given word
                start += word_starts[word_ids[index]]
                end += word_starts[word_ids[index]]
            span = sentence[start:end]
            if word_aware:
                is_subword = len(word) != len(span)
            else:
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if token_id == unk_id:
                word, is_subword = span, False
            tokens.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": index,
                           "is_subword": is_subword})
        return tokens

    def _aggregate(self, tokens: list[dict], strategy: str) -> list[dict]:
        id2label = self.model.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for token in tokens:
                best = int(token["scores"].argmax())
                entities.append({"entity": id2label[best], "score": token["scores"][best], "index": token["index"],
                                 "word": token["word"], "start": token["start"], "end": token["end"]})
        else:
            entities = [self._aggregate_word(word, strategy) for word in self._words(tokens)]
        return entities if strategy == "none" else self._group(entities)

    @staticmethod
    def _words(tokens: list[dict]) -> list[list[dict]]:
        """Tokens -> words: a word is a token followed by its sub-word continuations."""
        words: list[list[dict]] = []
        for token in tokens:
            if words and token["is_subword"]:
                words[-1].append(token)
            else:
                words.append([token])
        return words

    def _aggregate_word(self, tokens: list[dict], strategy: str) -> dict:
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.model.config.id2label[best], "score": scores[best],
                "word": self.tokenizer.convert_tokens_to_string([t["word"] for t in tokens]),
                "start": tokens[0]["start"], "end": tokens[-1]["end"]}

    def _group(self, entities: list[dict]) -> list[dict]:
        """Join adjacent entities of the same tag; a B- tag always starts a new group."""
        groups: list[list[dict]] = []
        for entity in entities:
            if groups:
                bi, tag = split_tag(entity["entity"])
                if tag == split_tag(groups[-1][-1]["entity"])[1] and bi != "B":
                    groups[-1].append(entity)
                    continue
            groups.append([entity])
        return [{
            "entity_group": str(group[0]["entity"]).split("-", 1)[-1],  # as transformers names it, whatever the prefix
            "score": np.nanmean([e["score"] for e in group]),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        } for group in groups]
