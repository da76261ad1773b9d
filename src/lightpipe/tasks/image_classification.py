"""image-classification: an image -> its top labels with scores."""

from __future__ import annotations

from typing import Any

from ..checks import positive_int
from ..errors import InvalidInput
from ..processing.image_io import load_image
from ..processing.sources import check_timeout
from ..runtime import ModelItem
from .base import Pipeline
from .text_classification import FUNCTIONS, apply_function, default_function

DEFAULT_TOP_K = 5


def one_image_batches_unless_fixed(processor, runtime: dict[str, Any]) -> dict[str, Any]:
    """The runtime parameters with batch_size 1 when `processor` sizes each image after its own aspect
    ratio (a shortest_edge resize and no crop): images of different sizes cannot be stacked, and padding
    them would change their answers. (transformers fails on such batches.)"""
    if processor.fixed_output_size:
        return runtime
    return {**runtime, "batch_size": 1}


class ImagePipeline(Pipeline):
    """A pipeline over an image processor: each input is loaded (path, URL, base64, bytes, PIL image or
    array), preprocessed to pixel_values (3, H, W), and batches are stacked (all images share one size)."""

    components = ("image_processor",)
    file_is_one_input = True  # pipe(open("cat.png", "rb")) is one image

    def __call__(self, inputs=None, **params):
        if "images" in params:  # transformers' keyword for the inputs
            if inputs is not None:
                raise InvalidInput("give the images once: as the first argument or as images=, not both.")
            inputs = params.pop("images")
        if inputs is None:
            raise InvalidInput("no image given: pass a path, URL, base64 string, bytes, PIL image or array.")
        return super().__call__(inputs, **params)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        check_timeout(params.get("timeout"))

    def _route(self, call_params: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
        runtime, pre, fwd, post = super()._route(call_params)
        return one_image_batches_unless_fixed(self.processor_for(pre), runtime), pre, fwd, post

    def processor_for(self, preprocess_params: dict[str, Any]):
        """The image processor one call uses."""
        return self.image_processor

    def image_item(self, image, timeout=None, processor=None) -> ModelItem:
        pixels = (processor or self.image_processor)(load_image(image, timeout=timeout))["pixel_values"]
        return ModelItem({"pixel_values": pixels})

    def model_dtype(self):
        return next(self.model.parameters()).dtype


class ImageClassificationPipeline(ImagePipeline):
    task = "image-classification"
    preprocess_params = ("timeout",)
    postprocess_params = ("top_k", "function_to_apply")

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        positive_int("top_k", params.get("top_k"), allow_none=True)
        fn = params.get("function_to_apply")
        if fn is not None and (not isinstance(fn, str) or fn.lower() not in FUNCTIONS + ("default",)):
            raise InvalidInput(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, not {fn!r}.")

    def preprocess(self, inputs, timeout=None):
        return [self.image_item(inputs, timeout)]

    def forward(self, batch):
        return {"logits": self.model(batch["pixel_values"].to(self.model_dtype()))["logits"]}

    def postprocess(self, outputs, metas, top_k=None, function_to_apply=None):
        """-> [{"label", "score"}], best first; top_k None means transformers' default of 5."""
        function = (function_to_apply or "default").lower()
        if function == "default":
            function = default_function(self.model.config)
        scores = apply_function(outputs[0]["logits"], function).tolist()
        id2label = self.model.config.id2label
        ranked = sorted(({"label": id2label[i], "score": s} for i, s in enumerate(scores)),
                        key=lambda d: d["score"], reverse=True)
        return ranked[: DEFAULT_TOP_K if top_k is None else top_k]
