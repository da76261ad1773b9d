"""zero-shot-classification: a text and candidate labels -> the labels ranked by an NLI model's scores.

Each label becomes a hypothesis through `hypothesis_template` ("This example is {}."); the model (any
sequence-classification checkpoint trained on natural language inference whose labels name an entailment label:
bart-large-mnli, RoBERTa / DeBERTa / BERT MNLI heads) reads the pair (text as premise, hypothesis) and its
entailment logit scores the label. Scores follow transformers: a softmax of the entailment logits across labels, or,
with `multi_label` (or a single label), a softmax of [contradiction, entailment] for each label alone.

How the pairs are batched. transformers runs one forward pass per (text, label) pair unless batch_size is set. Here
the unit of work is a text with all its labels: `batch_size` counts texts, and a batch holds batch_size x labels
pairs, ordered by length so that padding costs little (the pairs of one text, of nearly equal lengths, fall
together; the BERT-family encoders and BART's encoder skip padded slots anyway). An NLI model is a cross-encoder: every layer attends across
premise and hypothesis, so the premise's states differ for every label and no layer's work can be shared exactly
between labels; what a text's labels do share is the pass itself - one read of the weights and one wide matrix
product instead of one narrow pass per label - and the per-call work (labels parsed, template checked) done once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import flag
from ..errors import InvalidInput, UnsupportedModel
from ..runtime import ModelItem
from .base import TextPipeline
from .zero_shot_image_classification import check_template, parse_labels

DEFAULT_TEMPLATE = "This example is {}."
TRUNCATION = (True, False, "only_first", "longest_first", "do_not_truncate")


def entailment_id(config) -> int | None:
    """The id of the first label that starts with "entail" (any case), as transformers finds it; None if none."""
    for label, index in (config.label2id or {}).items():
        if str(label).lower().startswith("entail"):
            return int(index)
    return None


def check_hypothesis_template(template: Any) -> str:
    """A template with a place for the label: "This example is {}.". Without one every label would give the same
    hypothesis, so the scores would say nothing."""
    template = check_template(template)
    if template.format("\0label\0") == template:
        raise InvalidInput(f"hypothesis_template {template!r} has no place for the label; put {{}} where the label "
                           "goes, as in 'This example is {}.'")
    return template


def check_sequence(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"the text to classify must be a string, not {type(value).__name__}.")
    if not value:  # as transformers: "" is refused, a blank text is classified (its tokens are the special ones)
        raise InvalidInput("the text to classify is empty: give some text.")
    return value


class ZeroShotClassificationPipeline(TextPipeline):
    task = "zero-shot-classification"
    preprocess_params = ("candidate_labels", "hypothesis_template", "truncation")
    postprocess_params = ("multi_label",)

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.entailment_id = entailment_id(model.config)
        if self.entailment_id is None:
            labels = ", ".join(map(str, (model.config.label2id or {}))) or "none"
            raise UnsupportedModel(
                f"zero-shot-classification needs an NLI checkpoint whose config.json names an entailment label "
                f"(id2label such as {{0: 'contradiction', 1: 'neutral', 2: 'entailment'}}); this one's labels are: "
                f"{labels}. Use an NLI model (e.g. facebook/bart-large-mnli), or set id2label/label2id in its "
                "config.json if it was trained on NLI.")

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        if params.get("candidate_labels") is not None:
            parse_labels(params["candidate_labels"])
        if "hypothesis_template" in params:
            check_hypothesis_template(params["hypothesis_template"])
        if "multi_label" in params:
            flag("multi_label", params["multi_label"])
        if "truncation" in params and params["truncation"] not in TRUNCATION:
            raise InvalidInput(f"truncation must be True (cut the text, keep the hypothesis), False, 'only_first' or "
                               f"'longest_first', not {params['truncation']!r}.")

    def __call__(self, sequences, candidate_labels=None, **params):
        """sequences: a text or a list (or stream) of texts; candidate_labels: a list of labels or one
        comma-separated string. Returns {"sequence", "labels", "scores"} (labels best first), or a list of them."""
        if candidate_labels is not None:
            params["candidate_labels"] = candidate_labels
        labels = params.get("candidate_labels", self._defaults.get("candidate_labels"))
        if labels is None:
            raise InvalidInput('candidate_labels are needed: pipe("text", candidate_labels=["sports", "politics"]).')
        parse_labels(labels)
        if isinstance(sequences, (list, tuple)) and not sequences:
            raise InvalidInput("no text to classify: give a text or a non-empty list of texts.")
        return super().__call__(sequences, **params)

    def _route(self, call_params: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
        """batch_size counts texts: a batch holds batch_size x labels (text, label) pairs."""
        runtime, pre, fwd, post = super()._route(call_params)
        labels = parse_labels(pre["candidate_labels"])
        runtime = {**runtime, "batch_size": (runtime.get("batch_size") or 1) * len(labels)}
        return runtime, pre, fwd, post

    # ------------------------------------------------------------------ the three stages
    def preprocess(self, sequence, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE, truncation=True):
        """One text -> one model item per label: the pair (text, hypothesis). With truncation (the default, as in
        transformers) a text too long for the model is cut, never the hypothesis."""
        sequence = check_sequence(sequence)
        labels = parse_labels(candidate_labels)
        template = check_hypothesis_template(hypothesis_template)
        strategy = "only_first" if truncation is True else truncation
        items = []
        for label in labels:
            hypothesis = template.format(label)
            if strategy in (False, "do_not_truncate"):
                encoding = self.tokenizer.encode(sequence, hypothesis)
            else:
                encoding = self._truncated(sequence, hypothesis, strategy)
            items.append(ModelItem(self.features(encoding), meta={"label": label, "sequence": sequence}))
        return items

    def _truncated(self, sequence: str, hypothesis: str, strategy: str):
        try:
            return self.tokenizer.encode(sequence, hypothesis, truncation=strategy, max_length=self.max_positions)
        except InvalidInput as e:  # the hypothesis alone leaves no room for the text
            raise InvalidInput(f"the hypothesis {hypothesis[:60]!r} leaves no room for the text in this model's "
                               f"{self.max_positions} tokens; use a shorter label or hypothesis_template.") from e

    def forward(self, batch):
        return {"logits": self.model(**batch)["logits"]}

    def postprocess(self, outputs, metas, multi_label=False):
        logits = torch.stack([out["logits"] for out in outputs]).float()  # (labels, num_labels)
        entail = self.entailment_id
        if multi_label or len(outputs) == 1:
            contradiction = -1 if entail == 0 else 0  # transformers' rule: the first label, or the last
            scores = logits[:, [contradiction, entail]].softmax(dim=-1)[:, 1]  # each label alone
        else:
            scores = logits[:, entail].softmax(dim=0)  # the labels compete
        values = scores.tolist()
        # Best first; ties keep transformers' order (numpy's stable argsort, reversed: the later label first).
        order = sorted(range(len(values)), key=values.__getitem__)[::-1]
        return {"sequence": metas[0]["sequence"], "labels": [metas[i]["label"] for i in order],
                "scores": [values[i] for i in order]}
