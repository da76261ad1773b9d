"""LayoutLM (v1): BERT over words with their place on the page.

Each token carries its word's bounding box (x0, y0, x1, y1), integers on the 0-1000 grid of the
page (see lightpipe.processing.ocr). The embeddings add, to BERT's word + position + token type,
learned embeddings of the left and right edges (one x table), the top and bottom edges (one y
table), and the box's height and width. Everything after the embeddings is BERT's encoder, reused
from models/bert.py. No image pixels enter v1: the image only serves OCR.

Attribute names equal the checkpoint keys of Hugging Face LayoutLM checkpoints (e.g.
impira/layoutlm-document-qa), so a checkpoint loads with a strict `load_state_dict`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import InvalidInput
from . import bert
from .bert import BertConfig, BertEmbeddings, BertEncoder, BertPooler
from .layers import Embedding


@dataclasses.dataclass
class LayoutLMConfig(BertConfig):
    # Size of each coordinate table: box values must lie in [0, max_2d_position_embeddings).
    max_2d_position_embeddings: int = 1024


def check_boxes(bbox: torch.Tensor, limit: int) -> None:
    """Raise InvalidInput unless every (x0, y0, x1, y1) lies in [0, limit) with x0 <= x1 and y0 <= y1.

    An index outside an embedding table fails on the CPU with an opaque IndexError and on a GPU with a
    device-side assert that poisons the process, so boxes are checked before they are looked up."""
    if bbox.shape[-1] != 4:
        raise InvalidInput(f"bbox must have shape (batch, tokens, 4), not {tuple(bbox.shape)}.")
    width = bbox[..., 2] - bbox[..., 0]
    height = bbox[..., 3] - bbox[..., 1]
    if bool((bbox < 0).any() | (bbox >= limit).any() | (width < 0).any() | (height < 0).any()):
        raise InvalidInput(
            f"bounding boxes must be integers (x0, y0, x1, y1) in 0..{limit - 1} with x0 <= x1 and y0 <= y1, "
            "normalised to the page as int(1000 * x / width), int(1000 * y / height)."
        )


def check_token_types(token_type_ids: torch.Tensor | None, types: int) -> None:
    """Raise InvalidInput unless every token type id lies in [0, types): as for boxes, an id outside the table
    would fail with an opaque IndexError (or a device-side assert on a GPU)."""
    if token_type_ids is not None and bool((token_type_ids < 0).any() | (token_type_ids >= types).any()):
        raise InvalidInput(
            f"token_type_ids must lie in 0..{types - 1} (this model's type_vocab_size is {types}); a tokenizer "
            "that gives the second sequence of a pair type 1 does not belong to a model with one token type."
        )


class LayoutLMEmbeddings(BertEmbeddings):
    """BERT's embeddings plus four tables indexed by the token's box: x, y (edges), h, w (sizes)."""

    def __init__(self, config: LayoutLMConfig):
        super().__init__(config)
        self.x_position_embeddings = Embedding(config.max_2d_position_embeddings, config.hidden_size)
        self.y_position_embeddings = Embedding(config.max_2d_position_embeddings, config.hidden_size)
        self.h_position_embeddings = Embedding(config.max_2d_position_embeddings, config.hidden_size)
        self.w_position_embeddings = Embedding(config.max_2d_position_embeddings, config.hidden_size)

    def forward(self, input_ids, bbox, token_type_ids=None) -> torch.Tensor:
        """input_ids (B, T), bbox (B, T, 4) -> (B, T, C)."""
        t = input_ids.shape[1]
        position_ids = torch.arange(t, device=input_ids.device)[None, :]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        left, upper, right, lower = bbox.unbind(-1)  # (B, T) each
        # Summed in the reference's order, so float rounding matches it, and in place into the word embeddings'
        # fresh (B, T, C) tensor: eight fewer (B, T, C) temporaries than chained `a + b`.
        x = self.word_embeddings(input_ids)
        for table, index in ((self.position_embeddings, position_ids), (self.x_position_embeddings, left),
                             (self.y_position_embeddings, upper), (self.x_position_embeddings, right),
                             (self.y_position_embeddings, lower), (self.h_position_embeddings, lower - upper),
                             (self.w_position_embeddings, right - left), (self.token_type_embeddings, token_type_ids)):
            x += table(index)
        return self.LayerNorm(x)


class LayoutLMModel(nn.Module):
    """The bare encoder: (input_ids, bbox) -> last_hidden_state (B, T, C) and, with a pooler, pooler_output (B, C).

    `bbox` (B, T, 4) long; None means every box is (0, 0, 0, 0), as in the reference."""

    config_class = LayoutLMConfig
    base_model_prefix = "layoutlm"
    optional_modules = ("pooler",)  # dropped when a checkpoint has no pooler weights

    def __init__(self, config: LayoutLMConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = LayoutLMEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, bbox=None, attention_mask=None, token_type_ids=None) -> dict[str, torch.Tensor]:
        if bbox is None:
            bbox = input_ids.new_zeros((*input_ids.shape, 4))
        check_boxes(bbox, self.config.max_2d_position_embeddings)
        check_token_types(token_type_ids, self.config.type_vocab_size)
        hidden = self.encoder(self.embeddings(input_ids, bbox, token_type_ids), attention_mask)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden)
        return out


class LayoutLMForQuestionAnswering(nn.Module):
    """Extractive QA over a document's words: a start and an end logit per token, (B, T) each."""

    config_class = LayoutLMConfig
    base_model_prefix = "layoutlm"

    def __init__(self, config: LayoutLMConfig):
        super().__init__()
        self.config = config
        self.layoutlm = LayoutLMModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, bbox=None, attention_mask=None, token_type_ids=None):
        hidden = self.layoutlm(input_ids, bbox, attention_mask, token_type_ids)["last_hidden_state"]
        start, end = self.qa_outputs(hidden).unbind(-1)
        return {"start_logits": start, "end_logits": end}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT's clean-up: drop saved position_ids buffers and pretraining-only weights; gamma/beta names."""
    return bert.sanitize(state_dict)


ARCHITECTURES = {
    "LayoutLMModel": LayoutLMModel,
    "LayoutLMForQuestionAnswering": LayoutLMForQuestionAnswering,
}

HEADS = {
    "base": LayoutLMModel,
    "document-question-answering": LayoutLMForQuestionAnswering,
}
# A LayoutLM question-answering head reads documents (words with boxes), not plain text.
TASK_OF_HEAD = {"document-question-answering": "document-question-answering"}
Config = LayoutLMConfig
# Checkpoint keys a head may find and safely ignore: the QA checkpoints carry an unused pooler.
IGNORED_KEYS = (r"(^|\.)pooler\.",)
NO_SPLIT_MODULES = ("BertLayer",)  # blocks a device_map places whole
