"""BERT: the encoder and its task heads.

Attribute names equal the checkpoint keys of Hugging Face BERT checkpoints, so a checkpoint
loads with a strict `load_state_dict`. RoBERTa, XLM-RoBERTa and friends reuse `BertEncoder`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import UnsupportedModel
from .layers import Embedding, Unpadder, activation, attention, linear, merge_heads, split_heads


@dataclasses.dataclass
class BertConfig(BaseConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.position_embedding_type != "absolute":
            raise UnsupportedModel(
                f"position_embedding_type={self.position_embedding_type!r} is not supported; only 'absolute'."
            )
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModel("hidden_size must be a multiple of num_attention_heads")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        # No padding_idx: it only shapes training, and zeroing its row on the meta device costs an import.
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.LayerNorm(x)


def real_token_positions(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """Position ids that count real tokens only: (B, T) mask -> (B, T), 0 at each row's first real token.

    transformers numbers the slots 0..T-1 whatever the mask, so a left-padded row reads other positions than
    the same text alone and its answer depends on the batch it ran in. Counting real tokens keeps every row
    equal to its text alone on either padding side (right padding still gives 0..T-1 to the real tokens;
    padded slots get a clamped position that no real token reads). Without a mask: 0..T-1.
    """
    if attention_mask is None:
        return torch.arange(length, device=device)[None, :]
    return (attention_mask.long().cumsum(1) - 1).clamp_(min=0)


def first_real_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> (B, C): each row's first real token ([CLS] or <s>), where poolers and classifiers read.

    It sits at slot 0 unless the batch is padded on the left; reading slot 0 there would read padding."""
    if attention_mask is None:
        return hidden[:, 0]
    first = attention_mask.long().argmax(1)  # (B,) the first 1 of each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, batch: Unpadder):
        """x: (N, C) real tokens -> (N, C) attention outputs."""
        q = split_heads(batch.pad(linear(x, self.query)), self.num_heads)  # (B, H, T, D)
        k = split_heads(batch.pad(linear(x, self.key)), self.num_heads)
        v = split_heads(batch.pad(linear(x, self.value)), self.num_heads)
        return batch.unpad(merge_heads(attention(q, k, v, batch.mask)))


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(linear(h, self.dense) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, batch: Unpadder):
        return self.output(self.self(x, batch), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = config.hidden_act
        activation(self.act)  # unknown names fail at build time

    def forward(self, x):
        return linear(x, self.dense, self.act)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(linear(h, self.dense) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, batch: Unpadder):
        x = self.attention(x, batch)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attention_mask):
        """x: (B, T, C) embeddings -> (B, T, C); the layers run on real tokens only (see Unpadder)."""
        batch = Unpadder(attention_mask, x.shape[0], x.shape[1])
        h = batch.unpad(x)  # (N, C)
        for layer in self.layer:
            h = layer(h, batch)
        return batch.pad(h)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, attention_mask=None):
        return torch.tanh(self.dense(first_real_token(hidden, attention_mask)))


class BertModel(nn.Module):
    """The bare encoder: returns last_hidden_state (B, T, C) and, with a pooler, pooler_output (B, C)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    optional_modules = ("pooler",)  # dropped when a checkpoint has no pooler weights

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> dict[str, torch.Tensor]:
        positions = real_token_positions(attention_mask, input_ids.shape[1], input_ids.device)  # (B, T)
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids, positions), attention_mask)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden, attention_mask)
        return out


class BertForSequenceClassification(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids)["pooler_output"]
        return {"logits": self.classifier(pooled)}


class BertForTokenClassification(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return {"logits": self.classifier(hidden)}


class BertForQuestionAnswering(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        start, end = self.qa_outputs(hidden).unbind(-1)
        return {"start_logits": start, "end_logits": end}


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder's bias is `bias` itself when the embeddings are tied, its own tensor when they are not
        # (as in transformers 5, whose untied checkpoints train and save the two apart).
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"
    # The output projection shares its matrix with the input embeddings unless the config unties them.
    tied_weights = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return {"logits": self.cls(hidden)}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop buffers older checkpoints saved and the next-sentence head; give the decoder its bias."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("position_ids", "token_type_ids")) and "embeddings." in key:
            continue
        if key.startswith("cls.seq_relationship."):  # next-sentence head of pretraining checkpoints
            continue
        out[key] = value
    # Checkpoints saved with tied weights store the decoder's bias only as cls.predictions.bias (older ones
    # under both names, equal); untied ones carry their own, which is the one the decoder adds.
    if "cls.predictions.bias" in out and "cls.predictions.decoder.bias" not in out:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    # Very old checkpoints name LayerNorm parameters gamma/beta.
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in out.items()}


ARCHITECTURES = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
    "BertForMaskedLM": BertForMaskedLM,
    # Pretraining checkpoints carry an MLM head (cls.predictions.*) plus NSP weights we drop.
    "BertForPreTraining": BertForMaskedLM,
}

HEADS = {
    "base": BertModel,
    "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification,
    "question-answering": BertForQuestionAnswering,
    "masked-lm": BertForMaskedLM,
}
Config = BertConfig
# Checkpoint keys a head may find and safely ignore (weights of modules it does not use).
IGNORED_KEYS = (r"(^|\.)pooler\.",)
NO_SPLIT_MODULES = ("BertLayer",)  # blocks a device_map places whole
