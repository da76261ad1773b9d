"""DeBERTa-v2 and DeBERTa-v3: a BERT-shaped encoder whose attention also scores relative positions.

Disentangled attention adds to each content-to-content score q_i . k_j two terms read from a table of
relative-position embeddings: content-to-position (c2p, q_i . Kr[delta(i, j)]) and position-to-content
(p2c, k_j . Qr[delta(j, i)]), all divided by sqrt(D * (1 + number of those terms)). delta is i - j, cut to
`position_buckets` log-spaced buckets far away. v3 checkpoints have no absolute position embeddings at all
(position_biased_input false), so a row's result never depends on where padding puts it: relative positions
only see differences between slots, and the real tokens of a row are contiguous on either padding side.

Attribute names equal the checkpoint keys of Hugging Face DeBERTa-v2 checkpoints (deberta.encoder.layer.{i}
.attention.self.query_proj, deberta.encoder.rel_embeddings, pooler.dense, ...).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import UnsupportedModel
from .bert import first_real_token, real_token_positions
from .layers import Embedding, Unpadder, activation, linear, merge_heads, split_heads

POSITION_TERMS = ("c2p", "p2c")  # the relative-position terms DeBERTa-v2 computes; others in pos_att_type are unused


@dataclasses.dataclass
class DebertaV2Config(BaseConfig):
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: int | None = 0
    embedding_size: int | None = None  # word embeddings narrower than hidden_size go through embed_proj
    attention_head_size: int | None = None
    position_biased_input: bool = True  # absolute position embeddings added to the input (v2); v3 has none
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = -1  # > 0: relative positions in log buckets (v3: 256)
    pos_att_type: list[str] | str | None = None  # e.g. ["p2c", "c2p"] or "p2c|c2p"
    share_att_key: bool = False  # positions projected by query_proj/key_proj rather than pos_*_proj
    norm_rel_ebd: str = "none"  # "layer_norm": the relative embeddings go through encoder.LayerNorm
    conv_kernel_size: int = 0  # > 0: a convolution beside the first layer (v2-xlarge / xxlarge)
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    legacy: bool = True  # masked-LM head layout: cls.predictions.* (legacy) or lm_predictions.lm_head.*

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [part.strip() for part in self.pos_att_type.lower().split("|")]
        self.pos_att_type = list(self.pos_att_type or [])
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.attention_head_size is None:
            if self.hidden_size % self.num_attention_heads:
                raise UnsupportedModel("hidden_size must be a multiple of num_attention_heads")
            self.attention_head_size = self.hidden_size // self.num_attention_heads
        if self.attention_head_size * self.num_attention_heads != self.hidden_size:
            raise UnsupportedModel(
                f"attention_head_size={self.attention_head_size} times {self.num_attention_heads} heads differs "
                f"from hidden_size={self.hidden_size}; such a DeBERTa cannot be built (nor run by transformers)."
            )
        if self.pooler_hidden_size not in (None, self.hidden_size):
            raise UnsupportedModel(
                f"pooler_hidden_size={self.pooler_hidden_size} differs from hidden_size={self.hidden_size}; "
                "such a DeBERTa classifier cannot be built (transformers cannot run it either)."
            )
        if self.max_relative_positions < 1:
            self.max_relative_positions = self.max_position_embeddings
        activation(self.hidden_act)  # unknown names fail at build time
        activation(self.pooler_hidden_act)
        if self.conv_kernel_size > 0:
            activation(self.conv_act)

    @property
    def attention_span(self) -> int:
        """Relative distances the table covers on each side: the bucket count, else max_relative_positions."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def score_scale(self) -> float:
        """sqrt(D * (1 + number of relative terms)): each score term is divided by it."""
        terms = sum(term in self.pos_att_type for term in POSITION_TERMS)
        return math.sqrt(self.attention_head_size * (1 + terms))


# ----------------------------------------------------------------------------------------------
# Relative positions


def log_bucket(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Relative distances (long) -> bucket ids: exact within +-buckets/2, log-spaced beyond, up to max_position.

    Computed in float32 in the reference's order of operations: a ceil() sits on the result, so another order
    could move a distance at a bucket edge to the next bucket."""
    mid = buckets // 2
    sign = torch.sign(relative)
    near = (relative < mid) & (relative > -mid)
    distance = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())  # (T, T) long
    log_ratio = torch.log(torch.tensor((max_position - 1) / mid))  # float32 scalar
    far = torch.ceil(torch.log(distance / mid) / log_ratio * (mid - 1)) + mid  # (T, T) float32
    return torch.where(distance <= mid, relative.to(far.dtype), far * sign).long()


def relative_positions(length: int, config: DebertaV2Config, device) -> torch.Tensor:
    """(T, T) long: the (bucketed) distance i - j from query slot i to key slot j."""
    slots = torch.arange(length, dtype=torch.long, device=device)
    relative = slots[:, None] - slots[None, :]
    if config.position_buckets > 0:
        relative = log_bucket(relative, config.position_buckets, config.max_relative_positions)
    return relative


class RelativeIndex:
    """The rows of the relative-embedding table one forward pass reads, and where each score reads them.

    Distances longer than the table are clamped to its ends. Only rows [first, last] are ever read, so each
    layer projects those rows alone instead of the whole table (512 rows for v3, whatever the text's length)."""

    def __init__(self, length: int, config: DebertaV2Config, device):
        span = config.attention_span
        relative = relative_positions(length, config, device)  # (T, T)
        c2p = torch.clamp(relative + span, 0, 2 * span - 1)  # [i, j]: row of Kr that query i reads for key j
        p2c = torch.clamp(-relative + span, 0, 2 * span - 1)  # [j, i]: row of Qr that key j reads for query i
        self.first = int(torch.minimum(c2p.min(), p2c.min()))
        self.last = int(torch.maximum(c2p.max(), p2c.max()))
        self.c2p, self.p2c = c2p - self.first, p2c - self.first

    def rows(self, table: torch.Tensor) -> torch.Tensor:
        """(2 * span, C) table -> (R, C), the rows read."""
        return table[self.first: self.last + 1]


# ----------------------------------------------------------------------------------------------
# Layers


class DebertaV2Embeddings(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.embedding_size)
        self.position_embeddings = (Embedding(config.max_position_embeddings, config.embedding_size)
                                    if config.position_biased_input else None)
        self.token_type_embeddings = (Embedding(config.type_vocab_size, config.embedding_size)
                                      if config.type_vocab_size > 0 else None)
        self.embed_proj = (nn.Linear(config.embedding_size, config.hidden_size, bias=False)
                           if config.embedding_size != config.hidden_size else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C). position_ids (B, T) count real tokens (see bert.real_token_positions)."""
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(types)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x)


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.terms = [t for t in POSITION_TERMS if t in config.pos_att_type] if config.relative_attention else []
        self.scale = config.score_scale
        inner = config.hidden_size  # heads x attention_head_size (checked by the config)
        self.query_proj = nn.Linear(config.hidden_size, inner)
        self.key_proj = nn.Linear(config.hidden_size, inner)
        self.value_proj = nn.Linear(config.hidden_size, inner)
        self.share_att_key = config.share_att_key
        if config.relative_attention and not config.share_att_key:
            if "c2p" in self.terms:
                self.pos_key_proj = nn.Linear(config.hidden_size, inner)
            if "p2c" in self.terms:
                self.pos_query_proj = nn.Linear(config.hidden_size, inner)

    def position_projection(self, rel: torch.Tensor, term: str) -> torch.Tensor:
        """(R, C) relative embeddings -> (H, R, D): keys of positions for c2p, queries of positions for p2c."""
        if term == "c2p":
            layer = self.key_proj if self.share_att_key else self.pos_key_proj
        else:
            layer = self.query_proj if self.share_att_key else self.pos_query_proj
        return split_heads(linear(rel, layer)[None], self.num_heads)[0]

    def position_bias(self, q, k, rel: torch.Tensor, index: RelativeIndex) -> torch.Tensor:
        """The relative terms of the scores, already divided by the scale: (B, H, T, T)."""
        b, h, t, _ = q.shape
        bias = q.new_zeros(())
        if "c2p" in self.terms:
            scores = q @ self.position_projection(rel, "c2p").transpose(-1, -2)  # (B, H, T, R)
            bias = bias + scores.gather(-1, index.c2p.expand(b, h, t, t))  # [i, j] = q_i . Kr[delta(i, j)]
        if "p2c" in self.terms:
            scores = k @ self.position_projection(rel, "p2c").transpose(-1, -2)  # (B, H, T keys, R)
            # [j, i] = k_j . Qr[delta(j, i)], transposed to (query, key)
            bias = bias + scores.gather(-1, index.p2c.expand(b, h, t, t)).transpose(-1, -2)
        return bias / self.scale

    def forward(self, x, batch: Unpadder, rel: torch.Tensor | None, index: RelativeIndex | None):
        """x: (N, C) real tokens -> (N, H*D). rel: (R, C) normalised relative embeddings that `index` reads."""
        q = split_heads(batch.pad(linear(x, self.query_proj)), self.num_heads)  # (B, H, T, D)
        k = split_heads(batch.pad(linear(x, self.key_proj)), self.num_heads)
        v = split_heads(batch.pad(linear(x, self.value_proj)), self.num_heads)
        mask = batch.mask  # (B, 1, 1, T) boolean or None
        if self.terms:
            bias = self.position_bias(q, k, rel, index)  # (B, H, T, T)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            mask = bias
        # SDPA adds a float mask after scaling q . k: exactly q . k / scale + the relative terms.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / self.scale)
        return batch.unpad(merge_heads(out))


class DebertaV2SelfOutput(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(linear(h, self.dense) + residual)


class DebertaV2Attention(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = DebertaV2SelfOutput(config)

    def forward(self, x, batch: Unpadder, rel, index):
        return self.output(self.self(x, batch, rel, index), x)


class DebertaV2Intermediate(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = config.hidden_act

    def forward(self, x):
        return linear(x, self.dense, self.act)


class DebertaV2Output(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(linear(h, self.dense) + residual)


class DebertaV2Layer(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = DebertaV2Intermediate(config)
        self.output = DebertaV2Output(config)

    def forward(self, x, batch: Unpadder, rel, index):
        x = self.attention(x, batch, rel, index)
        return self.output(self.intermediate(x), x)


class ConvLayer(nn.Module):
    """v2-xlarge's convolution over the embeddings, added to the first layer's output (then normalised)."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        size = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, size, padding=(size - 1) // 2,
                              groups=config.conv_groups)
        self.act = activation(config.conv_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, embeddings, first_layer_out, batch: Unpadder):
        """embeddings: (B, T, C), zeros in padded slots, which pad the convolution as the text's edges do
        (so a row's result does not depend on its padding); first_layer_out: (N, C) -> (N, C)."""
        conv = self.conv(embeddings.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.LayerNorm(first_layer_out + self.act(batch.unpad(conv)))


class DebertaV2Encoder(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = Embedding(2 * config.attention_span, config.hidden_size)
        self.normalises_positions = "layer_norm" in [part.strip() for part in config.norm_rel_ebd.lower().split("|")]
        if self.normalises_positions:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.conv = ConvLayer(config) if config.conv_kernel_size > 0 else None

    def relative_table(self, index: RelativeIndex) -> torch.Tensor:
        """(R, C): the rows of the relative embeddings this pass reads, normalised if the config says so
        (LayerNorm acts on each row alone, so normalising the rows read equals slicing the normalised table)."""
        rel = index.rows(self.rel_embeddings.weight)
        return self.LayerNorm(rel) if self.normalises_positions else rel

    def forward(self, x, attention_mask):
        """x: (B, T, C) embeddings -> (B, T, C); the layers run on real tokens only (see Unpadder)."""
        batch = Unpadder(attention_mask, x.shape[0], x.shape[1])
        rel = index = None
        if self.config.relative_attention:
            index = RelativeIndex(x.shape[1], self.config, x.device)
            rel = self.relative_table(index)
        h = batch.unpad(x)  # (N, C)
        for i, layer in enumerate(self.layer):
            out = layer(h, batch, rel, index)
            if i == 0 and self.conv is not None:
                out = self.conv(batch.pad(h), out, batch)
            h = out
        return batch.pad(h)


# ----------------------------------------------------------------------------------------------
# Models


class DebertaV2Model(nn.Module):
    """The bare encoder: returns last_hidden_state (B, T, C)."""

    config_class = DebertaV2Config
    base_model_prefix = "deberta"

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> dict[str, torch.Tensor]:
        positions = real_token_positions(attention_mask, input_ids.shape[1], input_ids.device)  # (B, T)
        embeddings = self.embeddings(input_ids, token_type_ids, positions)
        return {"last_hidden_state": self.encoder(embeddings, attention_mask)}


class _DebertaHead(nn.Module):
    config_class = DebertaV2Config
    base_model_prefix = "deberta"

    def encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.deberta(input_ids, attention_mask, token_type_ids)["last_hidden_state"]  # (B, T, C)


class ContextPooler(nn.Module):
    """The first token ([CLS]) through dense + pooler_hidden_act (gelu, where BERT's pooler has tanh)."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = config.pooler_hidden_act

    def forward(self, hidden, attention_mask=None):
        return linear(first_real_token(hidden, attention_mask), self.dense, self.act)


class DebertaV2ForSequenceClassification(_DebertaHead):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.deberta = DebertaV2Model(config)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return {"logits": self.classifier(self.pooler(hidden, attention_mask))}


class DebertaV2ForTokenClassification(_DebertaHead):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.deberta = DebertaV2Model(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return {"logits": self.classifier(self.encode(input_ids, attention_mask, token_type_ids))}


class DebertaV2ForQuestionAnswering(_DebertaHead):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        if config.num_labels != 2:
            raise UnsupportedModel(
                f"a DeBERTa question-answering head gives start and end logits: num_labels must be 2, "
                f"not {config.num_labels}."
            )
        self.config = config
        self.deberta = DebertaV2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = self.qa_outputs(self.encode(input_ids, attention_mask, token_type_ids)).unbind(-1)
        return {"start_logits": start, "end_logits": end}


class PredictionHeadTransform(nn.Module):
    """hidden -> dense -> hidden_act -> LayerNorm, the part of the masked-LM heads before the vocabulary."""

    def __init__(self, config: DebertaV2Config, out_features: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, out_features)
        self.act = config.hidden_act
        self.LayerNorm = nn.LayerNorm(out_features, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(linear(x, self.dense, self.act))


class LegacyLMPredictionHead(nn.Module):
    """cls.predictions.*: the transform to embedding_size, then a decoder tied to the word embeddings."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.transform = PredictionHeadTransform(config, config.embedding_size)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x):
        return linear(self.transform(x), self.decoder)


class LegacyOnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.predictions = LegacyLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class LMPredictionHead(PredictionHeadTransform):
    """lm_predictions.lm_head.*: the transform, then the word embeddings themselves plus a bias."""

    def __init__(self, config: DebertaV2Config):
        super().__init__(config, config.hidden_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x, word_embeddings):
        return F.linear(super().forward(x), word_embeddings.weight, self.bias)


class OnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.lm_head = LMPredictionHead(config)

    def forward(self, x, word_embeddings):
        return self.lm_head(x, word_embeddings)


class DebertaV2ForMaskedLM(_DebertaHead):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.deberta = DebertaV2Model(config)
        if config.legacy:
            self.cls = LegacyOnlyMLMHead(config)
            # The decoder shares its matrix with the word embeddings unless the config unties them.
            self.tied_weights = {"cls.predictions.decoder.weight": "deberta.embeddings.word_embeddings.weight",
                                 "cls.predictions.decoder.bias": "cls.predictions.bias"}
        else:
            self.lm_predictions = OnlyMLMHead(config)
            self.tied_weights = {}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.config.legacy:
            return {"logits": self.cls(hidden)}
        return {"logits": self.lm_predictions(hidden, self.deberta.embeddings.word_embeddings)}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop saved position-id buffers; give a legacy decoder its bias (see bert.sanitize)."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
    if "cls.predictions.bias" in out and "cls.predictions.decoder.bias" not in out:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


Config = DebertaV2Config
HEADS = {
    "base": DebertaV2Model,
    "sequence-classification": DebertaV2ForSequenceClassification,
    "token-classification": DebertaV2ForTokenClassification,
    "question-answering": DebertaV2ForQuestionAnswering,
    "masked-lm": DebertaV2ForMaskedLM,
}
ARCHITECTURES = {
    "DebertaV2Model": DebertaV2Model,
    "DebertaV2ForSequenceClassification": DebertaV2ForSequenceClassification,
    "DebertaV2ForTokenClassification": DebertaV2ForTokenClassification,
    "DebertaV2ForQuestionAnswering": DebertaV2ForQuestionAnswering,
    "DebertaV2ForMaskedLM": DebertaV2ForMaskedLM,
}
# Checkpoint keys a head may find and safely ignore: a classifier's pooler under another head, the
# replaced-token-detection head of v3 pretraining checkpoints, and the absolute position table that
# some checkpoints keep although position_biased_input is false (transformers ignores it too).
IGNORED_KEYS = (r"^pooler\.", r"^mask_predictions\.", r"^lm_predictions\.", r"^cls\.",
                r"embeddings\.position_embeddings\.")
NO_SPLIT_MODULES = ("DebertaV2Layer",)  # blocks a device_map places whole
