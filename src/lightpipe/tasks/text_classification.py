"""text-classification (alias sentiment-analysis): a text or a text pair -> labels with scores."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..checks import flag, positive_int
from ..errors import InvalidInput
from ..runtime import ModelItem
from .base import TextPipeline

FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET = object()


def default_function(config) -> str:
    """transformers' rule: regression -> none; multi-label or a single label -> sigmoid; else softmax."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_function(logits: torch.Tensor, name: str) -> torch.Tensor:
    logits = logits.float()
    if name == "softmax":
        return torch.softmax(logits, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(logits)
    return logits


class TextClassificationPipeline(TextPipeline):
    task = "text-classification"
    preprocess_params = ("truncation", "max_length", "padding", "add_special_tokens")
    postprocess_params = ("top_k", "function_to_apply", "return_all_scores")

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        if "return_all_scores" in params:
            flag("return_all_scores", params["return_all_scores"])
            warnings.warn("return_all_scores is deprecated: use top_k=None for every label's score (sorted by score) "
                          "or top_k=1 for the best one.", FutureWarning, stacklevel=5)
        positive_int("top_k", params.get("top_k"), allow_none=True)
        fn = params.get("function_to_apply")
        if fn is not None and (not isinstance(fn, str) or fn.lower() not in FUNCTIONS + ("default",)):
            raise InvalidInput(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, not {fn!r}.")

    def __call__(self, inputs, **params):
        # transformers' shape rules: a single string without an explicit top_k gives a one-element list.
        results = super().__call__(inputs, **params)
        if isinstance(inputs, str) and "top_k" not in params:
            return [results]
        return results

    def _text_and_pair(self, value) -> tuple[str, str | None]:
        if isinstance(value, dict):
            extra = set(value) - {"text", "text_pair"}
            if "text" not in value or extra:
                raise InvalidInput('a text pair must be a dict {"text": ..., "text_pair": ...}' +
                                   (f"; unexpected keys {sorted(extra)}" if extra else ""))
            pair = value.get("text_pair") or None  # an empty pair is no pair, as transformers' tokenizer takes it
            return (self.check_text(value["text"], "text", allow_empty=True),
                    None if pair is None else self.check_text(pair, "text_pair", allow_empty=True))
        if isinstance(value, (list, tuple)):
            if len(value) == 2 and all(isinstance(v, str) for v in value):
                return (self.check_text(value[0], "text", allow_empty=True),
                        self.check_text(value[1], "text_pair", allow_empty=True) if value[1] else None)
            raise InvalidInput('a text pair must be a dict {"text": ..., "text_pair": ...} or a list [text, text_pair].')
        return self.check_text(value, allow_empty=True), None

    def preprocess(self, inputs, truncation=None, max_length=None, padding=None, add_special_tokens=True):
        text, pair = self._text_and_pair(inputs)
        encoding = self.tokenizer.encode(text, pair, truncation=truncation, max_length=max_length,
                                         add_special_tokens=add_special_tokens)
        return [ModelItem(self.features(encoding))]

    def forward(self, batch):
        return {"logits": self.model(**batch)["logits"]}

    def postprocess(self, outputs, metas, top_k=_UNSET, function_to_apply=None, return_all_scores=None):
        function = (function_to_apply or "default").lower()
        if function == "default":
            function = default_function(self.model.config)
        scores = apply_function(outputs[0]["logits"], function).numpy()
        id2label = self.model.config.id2label
        if top_k is _UNSET and return_all_scores:  # the old spelling: every label, in the model's label order
            return [{"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)]
        if top_k is _UNSET:  # no top_k given anywhere: transformers' single-dict form
            best = int(scores.argmax())
            return {"label": id2label[best], "score": float(scores[best])}
        ranked = sorted(({"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)),
                        key=lambda d: d["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]
