"""image-feature-extraction: an image -> the encoder's hidden states, or its pooled output."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from ..processing.sources import check_timeout
from .image_classification import ImagePipeline


class ImageFeatureExtractionPipeline(ImagePipeline):
    task = "image-feature-extraction"
    preprocess_params = ("timeout", "image_processor_kwargs")
    postprocess_params = ("pool", "return_tensors")

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        options = params.get("image_processor_kwargs")
        if options is not None:
            if not isinstance(options, dict):
                raise InvalidInput("image_processor_kwargs must be a dict of image processor settings.")
            options = dict(options)
            check_timeout(options.pop("timeout", None))
            self.image_processor.with_options(**options)  # unknown keys or bad values fail before any work
        if params.get("pool") and getattr(self.model, "pooler", True) is None:
            raise InvalidInput(
                f"pool=True needs a pooled output, but this {type(self.model).__name__} has no pooler "
                "(the checkpoint has no pooler weights); use pool=False for the hidden states."
            )

    def processor_for(self, preprocess_params: dict[str, Any]):
        options = dict(preprocess_params.get("image_processor_kwargs") or {})
        options.pop("timeout", None)
        return self.image_processor.with_options(**options)

    def preprocess(self, inputs, timeout=None, image_processor_kwargs=None):
        options = dict(image_processor_kwargs or {})
        # transformers passes these options on as the preprocessing parameters, so a "timeout" among
        # them is the URL timeout; a timeout given directly wins, as it does there.
        timeout = options.pop("timeout", None) if timeout is None else timeout
        options.pop("timeout", None)
        processor = self.image_processor.with_options(**options)
        return [self.image_item(inputs, timeout, processor)]

    def forward(self, batch):
        out = self.model(batch["pixel_values"].to(self.model_dtype()))
        return {name: out[name] for name in ("last_hidden_state", "pooler_output") if name in out}

    def postprocess(self, outputs, metas, pool=False, return_tensors=False):
        """-> nested lists shaped as transformers returns them: (1, T, C) hidden states, or (1, C') pooled."""
        values = outputs[0]["pooler_output" if pool else "last_hidden_state"][None]
        return values if return_tensors else values.float().tolist()
