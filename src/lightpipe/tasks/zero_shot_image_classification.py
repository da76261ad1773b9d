"""zero-shot-image-classification: an image and candidate labels -> the labels ranked by score.

Each label becomes a sentence through `hypothesis_template` ("This is a photo of {}."); CLIP embeds
the sentences and the image, and the softmax over their scaled cosine similarities scores the
labels. Unlike transformers, which runs the text encoder on every label sentence again for every
image (issue #24005), the sentences are encoded once per call (per distinct label set and
template) and only the images go through the model in batches: the scores are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import positive_int
from ..errors import CheckpointError, InvalidInput
from ..processing.image_io import load_image
from ..processing.sources import check_timeout
from ..runtime import ModelItem, Padding, collate
from .base import Pipeline
from .image_classification import one_image_batches_unless_fixed

DEFAULT_TEMPLATE = "This is a photo of {}."


def parse_labels(value: Any) -> tuple[str, ...]:
    """candidate_labels as given -> a tuple of label strings.

    A list (or tuple) of strings is taken as it is; a single string is read as comma-separated labels,
    as the text zero-shot-classification pipeline reads it (transformers would split it into characters)."""
    if value is None:
        raise InvalidInput('candidate_labels are needed: pipe(image, candidate_labels=["cat", "dog"]).')
    if isinstance(value, str):
        labels = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        labels = list(value)
        for label in labels:  # an empty label is kept: its sentence is the template alone, as in transformers
            if not isinstance(label, str):
                raise InvalidInput(f"each candidate label must be a string, not {type(label).__name__} ({label!r}).")
    else:
        raise InvalidInput(f"candidate_labels must be a list of strings (or one comma-separated string), "
                           f"not {type(value).__name__}.")
    if not labels:
        raise InvalidInput('candidate_labels is empty; give at least one label: candidate_labels=["cat", "dog"].')
    return tuple(labels)


def check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise InvalidInput(f"hypothesis_template must be a string such as {DEFAULT_TEMPLATE!r}, not {type(template).__name__}.")
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError) as e:
        raise InvalidInput(f"hypothesis_template {template!r} cannot be filled with a label ({e}); "
                           "use one empty placeholder {}, as in 'This is a photo of {}.'") from e
    return template


# tokenizer_kwargs keys that mean something for the label sentences. transformers accepts the parameter
# but drops it; here truncation works (a too long sentence is then cut, not refused). Padding never
# changes CLIP's scores (padded positions are masked and pooling reads the end-of-text token).
TOKENIZER_KWARGS = ("truncation", "max_length", "padding")


def check_tokenizer_kwargs(value: Any) -> tuple[tuple[str, Any], ...]:
    """tokenizer_kwargs -> a hashable, sorted tuple of its items, or InvalidInput."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidInput(f"tokenizer_kwargs must be a dict such as {{'truncation': True}}, "
                           f"not {type(value).__name__}.")
    unknown = sorted(set(value) - set(TOKENIZER_KWARGS))
    if unknown:
        raise InvalidInput(f"unknown tokenizer_kwargs {unknown}; accepted: {', '.join(TOKENIZER_KWARGS)}.")
    positive_int("tokenizer_kwargs max_length", value.get("max_length"), allow_none=True, minimum=2)
    if value.get("truncation") not in (None, True, False, "longest_first", "only_first", "do_not_truncate"):
        raise InvalidInput(f"tokenizer_kwargs truncation must be True, False, 'longest_first', 'only_first' or "
                           f"'do_not_truncate', not {value['truncation']!r}.")
    if value.get("padding") not in (None, True, False, "longest", "max_length", "do_not_pad"):
        raise InvalidInput(f"tokenizer_kwargs padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                           f"not {value['padding']!r}.")
    return tuple(sorted(value.items()))


class ZeroShotImageClassificationPipeline(Pipeline):
    task = "zero-shot-image-classification"
    components = ("tokenizer", "image_processor")
    file_is_one_input = True  # pipe(open("cat.png", "rb"), ...) is one image
    preprocess_params = ("candidate_labels", "hypothesis_template", "timeout")
    # The labels and template also reach forward, which embeds their sentences (once per call).
    forward_params = ("candidate_labels", "hypothesis_template", "tokenizer_kwargs")

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """CLIP's BPE marks word ends with "</w>". A tokenizer rebuilt from vocab.json + merges.txt as for
        RoBERTa lacks the mark and would give other ids, and so silently wrong scores: refuse it."""
        bpe = self.tokenizer.backend.model
        if (self.model.config.model_type == "clip" and type(bpe).__name__ == "BPE"
                and getattr(bpe, "end_of_word_suffix", None) != "</w>"):
            raise CheckpointError(
                f"the tokenizer of {self.tokenizer.name_or_path or 'this CLIP model'} does not split words as CLIP "
                "does (no '</w>' word ends): lightpipe reads CLIP tokenizers from tokenizer.json; add the "
                "checkpoint's tokenizer.json beside vocab.json and merges.txt."
            )

    @property
    def accepted_params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(super().accepted_params))

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        if params.get("candidate_labels") is not None:
            parse_labels(params["candidate_labels"])
        if "hypothesis_template" in params:
            check_template(params["hypothesis_template"])
        check_tokenizer_kwargs(params.get("tokenizer_kwargs"))
        if params.get("timeout") is not None:
            check_timeout(params["timeout"])

    def __call__(self, image=None, candidate_labels=None, **params):
        """image: a path, URL, base64 string, PIL image or array, or a list / stream of them.
        Returns [{"score", "label"}, ...] sorted by score, or one such list per image."""
        if "images" in params:  # transformers' older keyword
            if image is not None:
                raise InvalidInput("give the image(s) once: as the first argument or as images=, not both.")
            image = params.pop("images")
        if image is None:
            raise InvalidInput('give an image: pipe(image, candidate_labels=["cat", "dog"]).')
        if candidate_labels is not None:
            params["candidate_labels"] = candidate_labels
        # Checked before any image is read, so that an empty list of images fails the same way.
        parse_labels(params.get("candidate_labels", self._defaults.get("candidate_labels")))
        return super().__call__(image, **params)

    def _route(self, call_params: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
        runtime, pre, fwd, post = super()._route(call_params)
        return one_image_batches_unless_fixed(self.image_processor, runtime), pre, fwd, post

    # ------------------------------------------------------------------ the three stages
    def preprocess(self, image, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE, timeout=None):
        labels = parse_labels(candidate_labels)
        pixels = self.image_processor(load_image(image, timeout=timeout))["pixel_values"]  # (3, H, W)
        return [ModelItem({"pixel_values": pixels}, meta={"labels": labels})]

    def _forward_fn(self, fwd: dict[str, Any]):
        # A fresh cache for each call: the label sentences are embedded by the first batch, reused by the rest.
        return super()._forward_fn({**fwd, "text_cache": {}})

    def forward(self, batch, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE, tokenizer_kwargs=None,
                text_cache=None):
        key = (parse_labels(candidate_labels), hypothesis_template, check_tokenizer_kwargs(tokenizer_kwargs))
        cache = {} if text_cache is None else text_cache
        if key not in cache:
            cache[key] = self.label_features(*key)
        image_embeds = self.model.get_image_features(batch["pixel_values"])  # (B, P)
        return {"logits": self.model.similarity(image_embeds, cache[key])}  # (B, labels)

    def label_features(self, labels: tuple[str, ...], template: str,
                       tokenizer_kwargs: tuple[tuple[str, Any], ...] = ()) -> torch.Tensor:
        """The labels' sentences -> (labels, P) text embeddings, padded together as transformers pads them."""
        sentences = [template.format(label) for label in labels]
        limit = self.model.config.text_config.max_position_embeddings
        options = dict(tokenizer_kwargs)
        truncation = options.get("truncation")
        max_length = options.get("max_length") or min(limit, self.tokenizer.model_max_length)
        items = []
        for sentence in sentences:
            if truncation not in (None, False, "do_not_truncate"):
                encoding = self.tokenizer.encode(sentence, truncation=truncation, max_length=max_length)
            else:
                encoding = self.tokenizer.encode(sentence)
            if len(encoding.ids) > limit:
                raise InvalidInput(f"the label sentence {sentence[:60]!r} is {len(encoding.ids)} tokens long, more "
                                   f"than this model's {limit}; use a shorter label or hypothesis_template, or "
                                   "tokenizer_kwargs={'truncation': True}.")
            items.append(ModelItem({"input_ids": torch.tensor(encoding.ids, dtype=torch.long),
                                    "attention_mask": torch.tensor(encoding.attention_mask, dtype=torch.long)}))
        pad_id = self.tokenizer.pad_token_id
        padding = Padding(values={"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0},
                          side=self.tokenizer.padding_side)
        text = {k: v.to(self.device) for k, v in collate(items, padding).items()}
        return self.model.get_text_features(text["input_ids"], text["attention_mask"])

    def postprocess(self, outputs, metas):
        scores = torch.softmax(outputs[0]["logits"].float(), dim=-1).tolist()
        ranked = sorted(zip(scores, metas[0]["labels"]), key=lambda pair: -pair[0])  # stable: ties keep label order
        return [{"score": score, "label": label} for score, label in ranked]
