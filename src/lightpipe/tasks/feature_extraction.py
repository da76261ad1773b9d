"""feature-extraction: text -> the encoder's last hidden states, (1, tokens, hidden) per input."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from ..runtime import ModelItem
from .base import TextPipeline


class FeatureExtractionPipeline(TextPipeline):
    task = "feature-extraction"
    preprocess_params = ("truncation", "max_length", "tokenize_kwargs", "add_special_tokens")
    postprocess_params = ("return_tensors",)
    sequence_outputs = ("last_hidden_state",)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        kwargs = params.get("tokenize_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise InvalidInput("tokenize_kwargs must be a dict.")
            unknown = set(kwargs) - {"truncation", "max_length", "add_special_tokens", "padding"}
            if unknown:
                raise InvalidInput(f"tokenize_kwargs has unsupported keys {sorted(unknown)}; "
                                   "supported: truncation, max_length, add_special_tokens, padding.")
            if "truncation" in kwargs and "truncation" in params:
                raise InvalidInput("truncation was given twice: as a parameter and in tokenize_kwargs.")

    def preprocess(self, inputs, truncation=None, max_length=None, tokenize_kwargs=None, add_special_tokens=True):
        options = {"truncation": truncation, "max_length": max_length, "add_special_tokens": add_special_tokens}
        options.update({k: v for k, v in (tokenize_kwargs or {}).items() if k != "padding"})
        encoding = self.tokenizer.encode(self.check_text(inputs, allow_empty=True), **options)
        return [ModelItem(self.features(encoding))]

    def forward(self, batch):
        return {"last_hidden_state": self.model(**batch)["last_hidden_state"]}

    def postprocess(self, outputs, metas, return_tensors=False):
        hidden = outputs[0]["last_hidden_state"][None]  # (1, T, C), as transformers returns it
        return hidden if return_tensors else hidden.float().tolist()
