"""fill-mask: a text with one or more mask tokens -> the most likely tokens for each mask.

Results follow transformers: for a text with one mask, a list of
`{"score", "token", "token_str", "sequence"}` dicts, best first; for several masks, one such
list per mask (each mask scored on its own, the others left masked). A list of texts gives a
list of those, except that a list of exactly one text gives that text's result, as transformers does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..checks import positive_int
from ..errors import InvalidInput
from ..runtime import ModelItem
from .base import TextPipeline

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
# Keys of `tokenizer_kwargs` we understand. Padding is accepted and ignored: the runtime pads
# batches itself, and padding never changes a result.
TOKENIZER_KWARGS = ("truncation", "max_length", "add_special_tokens", "padding")
# Parameters for which None means "not given": the construction-time value (or the default) applies.
NONE_MEANS_UNSET = ("top_k", "targets", "tokenizer_kwargs")


class FillMaskPipeline(TextPipeline):
    task = "fill-mask"
    preprocess_params = ("tokenizer_kwargs",)
    postprocess_params = ("top_k", "targets")

    def __init__(self, model, tokenizer=None, **kwargs):
        if tokenizer is None or tokenizer.mask_token_id is None:
            name = None if tokenizer is None else tokenizer.mask_token
            raise InvalidInput(
                "fill-mask needs a tokenizer with a mask token"
                + (f"; this one names {name!r}, which is not in its vocabulary." if name else "; this one has none.")
            )
        self._target_cache: dict[tuple[str, ...], list[int]] = {}
        super().__init__(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        positive_int("top_k", params.get("top_k"), allow_none=True)
        kwargs = params.get("tokenizer_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise InvalidInput(f"tokenizer_kwargs must be a dict, not {type(kwargs).__name__}.")
            unknown = sorted(set(kwargs) - set(TOKENIZER_KWARGS))
            if unknown:
                raise InvalidInput(
                    f"tokenizer_kwargs {unknown} are not supported; supported: {', '.join(TOKENIZER_KWARGS)}."
                )
            positive_int("tokenizer_kwargs['max_length']", kwargs.get("max_length"), allow_none=True)
        if params.get("targets") is not None:
            self.target_ids(params["targets"])  # resolve now: a bad target fails before any work

    def target_ids(self, targets: str | list[str] | tuple[str, ...]) -> list[int]:
        """Targets -> the vocabulary ids to score, as transformers picks them.

        A target that is a vocabulary entry is used as is (for byte-level BPE that means spelled
        with its "Ġ" when it follows a space). Any other target is tokenized without special tokens
        and its first token is used, with a warning; a target that gives no token is dropped.
        """
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not targets:
            raise InvalidInput(f"targets must be a string or a non-empty list of strings, not {targets!r}.")
        key = tuple(targets)
        if not all(isinstance(t, str) for t in key):
            raise InvalidInput(f"targets must be strings, not {[type(t).__name__ for t in key]}.")
        if key in self._target_cache:
            return self._target_cache[key]
        ids: list[int] = []
        for target in key:
            index = self.tokenizer.token_to_id(target)
            if index is None:
                # Tokenized as transformers does (truncated to one token, from the tokenizer's truncation side).
                pieces = self.tokenizer.encode(target, add_special_tokens=False, truncation=True, max_length=1).ids
                if not pieces:
                    logger.warning("the target %r is not in the model's vocabulary and gives no token; it is ignored.",
                                   target)
                    continue
                index = pieces[0]
                logger.warning("the target %r is not in the model's vocabulary; using its first token %r instead.",
                               target, self.tokenizer.id_to_token(index))
            ids.append(index)
        if not ids:
            raise InvalidInput(f"none of the targets {list(key)} gives a token of this model's vocabulary.")
        resolved = sorted(set(ids))
        self._target_cache[key] = resolved
        return resolved

    # ------------------------------------------------------------------ calling
    def __call__(self, inputs, **params):
        params = {k: v for k, v in params.items() if not (v is None and k in NONE_MEANS_UNSET)}
        results = super().__call__(inputs, **params)
        # transformers unwraps a list of one text (on_error="skip" may have left none)
        if isinstance(inputs, list) and len(inputs) == 1 and len(results) == 1:
            return results[0]
        return results

    def preprocess(self, inputs, tokenizer_kwargs=None):
        text = self.check_text(inputs)
        kwargs = tokenizer_kwargs or {}
        encoding = self.tokenizer.encode(text, truncation=kwargs.get("truncation"),
                                         max_length=kwargs.get("max_length"),
                                         add_special_tokens=kwargs.get("add_special_tokens", True))
        mask_id = self.tokenizer.mask_token_id
        positions = [i for i, t in enumerate(encoding.ids) if t == mask_id]
        if not positions:
            mask = self.tokenizer.mask_token
            hint = "; truncation may have cut it off" if kwargs.get("truncation") else ""
            raise InvalidInput(f"no mask token ({mask}) found in the input{hint}: write {mask} where a token "
                               "is to be predicted.")
        return [ModelItem(self.features(encoding), meta={"ids": list(encoding.ids), "positions": positions})]

    def forward(self, batch):
        logits = self.model(**batch)["logits"]  # (B, T, V)
        # Only the rows at mask positions leave the device: (B, M, V), M = most masks in one text,
        # each text's masks in order in its first slots (the rest zero, dropped by postprocess).
        is_mask = batch["input_ids"] == self.tokenizer.mask_token_id  # (B, T)
        slot = is_mask.long().cumsum(1) - 1  # (B, T): index of each mask among its text's masks
        rows, cols = is_mask.nonzero(as_tuple=True)
        width = int(slot[rows, cols].max()) + 1
        out = logits.new_zeros((logits.shape[0], width, logits.shape[-1]))
        out[rows, slot[rows, cols]] = logits[rows, cols]
        return {"mask_logits": out}

    def postprocess(self, outputs, metas, top_k=None, targets=None):
        ids, positions = metas[0]["ids"], metas[0]["positions"]
        probs = outputs[0]["mask_logits"][: len(positions)].float().softmax(-1)  # (masks, V)
        candidates = None
        if targets is not None:
            candidates = self.target_ids(targets)
            probs = probs[:, candidates]
        k = min(DEFAULT_TOP_K if top_k is None else top_k, probs.shape[-1])
        scores, indices = probs.topk(k)
        single = len(positions) == 1
        pad_id = self.tokenizer.pad_token_id
        per_mask = []
        for position, row_scores, row_indices in zip(positions, scores.tolist(), indices.tolist()):
            row = []
            for score, index in zip(row_scores, row_indices):
                token = candidates[index] if candidates is not None else index
                filled = [token if i == position else t for i, t in enumerate(ids)]
                filled = [t for t in filled if t != pad_id]
                # With several masks the others stay visible, so special tokens are kept, as in transformers.
                row.append({"score": score, "token": token, "token_str": self.tokenizer.decode([token]),
                            "sequence": self.tokenizer.decode(filled, skip_special_tokens=single)})
            per_mask.append(row)
        return per_mask[0] if single else per_mask
