"""DistilBERT: a six-layer distilled BERT without token types or a pooler, with its own key names."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import UnsupportedModel
from .bert import first_real_token, real_token_positions
from .layers import Embedding, Unpadder, activation, attention, linear, merge_heads, split_heads


@dataclasses.dataclass
class DistilBertConfig(BaseConfig):
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise UnsupportedModel("dim must be a multiple of n_heads")


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.dim)  # no padding_idx: inference only
        self.position_embeddings = Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(self, input_ids, positions):
        """(B, T) ids and (B, T) or (1, T) position ids -> (B, T, dim)."""
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)

    def forward(self, x, batch: Unpadder):
        """x: (N, C) real tokens -> (N, C)."""
        q = split_heads(batch.pad(linear(x, self.q_lin)), self.n_heads)  # (B, H, T, D)
        k = split_heads(batch.pad(linear(x, self.k_lin)), self.n_heads)
        v = split_heads(batch.pad(linear(x, self.v_lin)), self.n_heads)
        return linear(batch.unpad(merge_heads(attention(q, k, v, batch.mask))), self.out_lin)


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act = config.activation
        activation(self.act)  # unknown names fail at build time

    def forward(self, x):
        return linear(linear(x, self.lin1, self.act), self.lin2)


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(self, x, batch: Unpadder):
        x = self.sa_layer_norm(self.attention(x, batch) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))

    def forward(self, x, attention_mask):
        """x: (B, T, C) embeddings -> (B, T, C); the layers run on real tokens only (see Unpadder)."""
        batch = Unpadder(attention_mask, x.shape[0], x.shape[1])
        h = batch.unpad(x)  # (N, C)
        for layer in self.layer:
            h = layer(h, batch)
        return batch.pad(h)


class DistilBertModel(nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def forward(self, input_ids, attention_mask=None) -> dict[str, torch.Tensor]:
        positions = real_token_positions(attention_mask, input_ids.shape[1], input_ids.device)  # (B, T)
        return {"last_hidden_state": self.transformer(self.embeddings(input_ids, positions), attention_mask)}


class DistilBertForSequenceClassification(nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.distilbert(input_ids, attention_mask)["last_hidden_state"]
        first = first_real_token(hidden, attention_mask)  # (B, dim)
        return {"logits": self.classifier(torch.relu(self.pre_classifier(first)))}


class DistilBertForTokenClassification(nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.classifier(self.distilbert(input_ids, attention_mask)["last_hidden_state"])}


class DistilBertForQuestionAnswering(nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.qa_outputs = nn.Linear(config.dim, 2)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.distilbert(input_ids, attention_mask)["last_hidden_state"]
        start, end = self.qa_outputs(hidden).unbind(-1)
        return {"start_logits": start, "end_logits": end}


class DistilBertForMaskedLM(nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    tied_weights = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.act = activation(config.activation)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.distilbert(input_ids, attention_mask)["last_hidden_state"]
        return {"logits": self.vocab_projector(self.vocab_layer_norm(self.act(self.vocab_transform(hidden))))}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


Config = DistilBertConfig
HEADS = {
    "base": DistilBertModel,
    "sequence-classification": DistilBertForSequenceClassification,
    "token-classification": DistilBertForTokenClassification,
    "question-answering": DistilBertForQuestionAnswering,
    "masked-lm": DistilBertForMaskedLM,
}
ARCHITECTURES = {cls.__name__: cls for cls in HEADS.values()}
NO_SPLIT_MODULES = ("TransformerBlock",)  # blocks a device_map places whole
