"""HuBERT: Wav2Vec2's architecture under other checkpoint names.

The feature encoder, positional convolution and Transformer layers are Wav2Vec2's (models/wav2vec2.py).
HuBERT differs only in its checkpoint prefix ("hubert."), a layer norm before the feature projection
that `feat_proj_layer_norm` may switch off, and, in some checkpoints, a batch norm before the
positional convolution (`conv_pos_batch_norm`) instead of weight normalisation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedModel
from .layers import linear
from .wav2vec2 import Wav2Vec2Config, Wav2Vec2Model, output_lengths, sanitize  # noqa: F401  (sanitize is this module's too)


@dataclasses.dataclass
class HubertConfig(Wav2Vec2Config):
    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: bool = False


class HubertModel(Wav2Vec2Model):
    config_class = HubertConfig
    base_model_prefix = "hubert"


class HubertForCTC(nn.Module):
    """Frame-wise character logits for CTC decoding: (B, S) audio -> logits (B, T, vocab)."""

    config_class = HubertConfig
    base_model_prefix = "hubert"

    def __init__(self, config: HubertConfig):
        super().__init__()
        if not config.vocab_size:
            raise UnsupportedModel("a HuBERT CTC checkpoint needs vocab_size in its config.json.")
        self.config = config
        self.hubert = HubertModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def output_lengths(self, samples):
        return output_lengths(self.config, samples)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h, batch = self.hubert.encode(input_values, attention_mask)
        return {"logits": batch.pad(linear(h, self.lm_head))}


ARCHITECTURES = {
    "HubertModel": HubertModel,
    "HubertForCTC": HubertForCTC,
}

HEADS = {
    "base": HubertModel,
    "ctc": HubertForCTC,
}
Config = HubertConfig
NO_SPLIT_MODULES = ("Wav2Vec2EncoderLayer", "Wav2Vec2EncoderLayerStableLayerNorm")  # blocks a device_map places whole
