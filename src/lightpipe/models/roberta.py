"""RoBERTa (and XLM-RoBERTa, CamemBERT): BERT's encoder with offset positions and its own heads.

Positions count only real tokens and start after the padding index, so padding on either side
never shifts them. The encoder layers are BERT's, shared rather than copied.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertConfig, BertEmbeddings, BertEncoder, BertPooler, first_real_token


@dataclasses.dataclass
class RobertaConfig(BertConfig):
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            real = (input_ids != self.padding_idx).long()
            position_ids = torch.cumsum(real, dim=1) * real + self.padding_idx  # (B, T)
        return super().forward(input_ids, token_type_ids, position_ids)


class RobertaModel(nn.Module):
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    optional_modules = ("pooler",)

    def __init__(self, config: RobertaConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = RobertaEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    # Positions start at pad_token_id + 1: the usable length is shorter than the embedding table.
    @property
    def position_offset(self) -> int:
        return (self.config.pad_token_id or 0) + 1

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> dict[str, torch.Tensor]:
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), attention_mask)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden, attention_mask)
        return out


class _RobertaHead(nn.Module):
    config_class = RobertaConfig
    base_model_prefix = "roberta"

    @property
    def position_offset(self) -> int:
        return self.roberta.position_offset


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden, attention_mask=None):
        return self.out_proj(torch.tanh(self.dense(first_real_token(hidden, attention_mask))))  # the <s> token


class RobertaForSequenceClassification(_RobertaHead):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.roberta(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return {"logits": self.classifier(hidden, attention_mask)}


class RobertaForTokenClassification(_RobertaHead):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.roberta(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return {"logits": self.classifier(hidden)}


class RobertaForQuestionAnswering(_RobertaHead):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.roberta(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        start, end = self.qa_outputs(hidden).unbind(-1)
        return {"start_logits": start, "end_logits": end}


class RobertaLMHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # The decoder's bias is `bias` itself when the embeddings are tied, its own tensor when they are not.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x):
        x = self.layer_norm(F.gelu(self.dense(x)))  # always exact gelu, whatever hidden_act says
        return self.decoder(x)


class RobertaForMaskedLM(_RobertaHead):
    tied_weights = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                    "lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.roberta(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return {"logits": self.lm_head(hidden)}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop saved position-id buffers; give the decoder its bias (see bert.sanitize)."""
    out = {k: v for k, v in state_dict.items()
           if not k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}
    if "lm_head.bias" in out and "lm_head.decoder.bias" not in out:
        out["lm_head.decoder.bias"] = out["lm_head.bias"]
    return out


Config = RobertaConfig
HEADS = {
    "base": RobertaModel,
    "sequence-classification": RobertaForSequenceClassification,
    "token-classification": RobertaForTokenClassification,
    "question-answering": RobertaForQuestionAnswering,
    "masked-lm": RobertaForMaskedLM,
}
ARCHITECTURES = {
    "RobertaModel": RobertaModel, "XLMRobertaModel": RobertaModel, "CamembertModel": RobertaModel,
    **{f"{prefix}For{kind}": HEADS[head]
       for prefix in ("Roberta", "XLMRoberta", "Camembert")
       for kind, head in (("SequenceClassification", "sequence-classification"),
                          ("TokenClassification", "token-classification"),
                          ("QuestionAnswering", "question-answering"), ("MaskedLM", "masked-lm"))},
}
IGNORED_KEYS = (r"(^|\.)pooler\.",)
NO_SPLIT_MODULES = ("BertLayer",)  # blocks a device_map places whole
