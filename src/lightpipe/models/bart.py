"""BART (facebook/bart-large, bart-large-mnli, bart-large-cnn, distilbart-*): a post-norm encoder-decoder transformer.

Attribute names equal the keys of Hugging Face BART checkpoints. What sets BART apart:
- learned positions that index a table offset by 2 (a leftover of fairseq's padding index), a layer norm right
  after the embeddings (`layernorm_embedding`), token embeddings optionally scaled by sqrt(d_model);
- post-norm blocks (residual add, then layer norm) and no final layer norm (mBART is pre-norm with one: another
  layout, not served here);
- one token-embedding matrix (`model.shared`) for the encoder, the decoder and the language-model head.

The encoder runs on the real tokens of a padded batch only (layers.Unpadder). The decoder runs against an explicit
`EncoderDecoderCache` (models/layers.py): cross-attention keys/values are computed once per input in `new_cache`,
together with the encoder's padding mask (`cross_mask`), and shared by all beams of that input.

Heads: `BartForSequenceClassification` classifies from the decoder state at each row's last end-of-sequence token
(NLI checkpoints such as bart-large-mnli: zero-shot classification); `BartForConditionalGeneration` generates text
on lightpipe.generation (`encode`, `new_cache`, `decode_step`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .bert import real_token_positions
from .layers import (EncoderDecoderCache, Embedding, FusedProjection, Unpadder, activation, attention, cached_attention,
                     clamp_half, cross_attention, linear, merge_heads, padding_mask, split_heads, vocab_logits)

POSITION_OFFSET = 2  # position p reads row p + 2 of embed_positions


@dataclasses.dataclass
class BartConfig(BaseConfig):
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise UnsupportedModel(f"d_model ({self.d_model}) must be a multiple of the attention heads ({heads}).")
        activation(self.activation_function)  # an unknown name fails at load time

    @property
    def embed_scale(self) -> float:
        return self.d_model ** 0.5 if self.scale_embedding else 1.0

    @property
    def end_token(self) -> int:
        """The end-of-sequence id, where the classification head reads (the first one when config.json lists several)."""
        eos = self.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise UnsupportedModel("this BART config names no eos_token_id: the classification head reads the state "
                                   "at the end-of-sequence token; set eos_token_id in config.json.")
        return eos


# ----------------------------------------------------------------------------------------------
# Layers


class BartAttention(nn.Module):
    """Multi-head attention with biases on every projection. The products that read the same input run as one:
    queries/keys/values in self-attention, keys/values of the encoder output in cross-attention (FusedProjection)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self._qkv = FusedProjection()
        self._kv = FusedProjection()

    def projected(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 3C): queries, keys and values side by side, from one matrix product."""
        return linear(x, self._qkv.refresh((self.q_proj, self.k_proj, self.v_proj)))

    def heads_of(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, 3C) -> queries, keys, values, each (B, H, T, D) (strided views: nothing is copied)."""
        b, t, _ = qkv.shape
        return qkv.view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D)."""
        return split_heads(linear(x, self.q_proj), self.num_heads)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) -> keys and values, each (B, H, S, D), contiguous (they are read at every decode step)."""
        b, s, _ = x.shape
        kv = linear(x, self._kv.refresh((self.k_proj, self.v_proj))).view(b, s, 2, self.num_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k.contiguous(), v.contiguous()

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, C)."""
        return linear(merge_heads(heads), self.out_proj)


class BartEncoderLayer(nn.Module):
    """Post-norm: x = norm(x + attention(x)); x = norm(x + mlp(x)). Runs on the (N, C) real tokens of a batch."""

    def __init__(self, config: BartConfig):
        super().__init__()
        dim = config.d_model
        self.act = config.activation_function
        self.self_attn = BartAttention(dim, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        """x: (N, C) real tokens -> (N, C)."""
        q, k, v = self.self_attn.heads_of(batch.pad(self.self_attn.projected(x)))  # (B, H, T, D) each
        attended = batch.unpad(merge_heads(attention(q, k, v, batch.mask)))  # (N, C)
        x = self.self_attn_layer_norm(x + linear(attended, self.self_attn.out_proj))
        x = self.final_layer_norm(x + linear(linear(x, self.fc1, self.act), self.fc2))
        return clamp_half(x, only_on_overflow=True)


class BartDecoderLayer(nn.Module):
    """Post-norm: causal self-attention over the cache, cross-attention over the encoder output, MLP."""

    def __init__(self, config: BartConfig):
        super().__init__()
        dim, heads = config.d_model, config.decoder_attention_heads
        self.act = config.activation_function
        self.self_attn = BartAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = BartAttention(dim, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cache: EncoderDecoderCache, index: int, mask) -> torch.Tensor:
        """x: (B, t, C) the new positions -> (B, t, C)."""
        q, k, v = self.self_attn.heads_of(self.self_attn.projected(x))
        k, v = cache.update(index, k, v)  # (B, H, length + t, D)
        x = self.self_attn_layer_norm(x + self.self_attn.output(cached_attention(q, k, v, mask)))
        enc_k, enc_v = cache.cross[index]
        attended, _ = cross_attention(self.encoder_attn.queries(x), enc_k, enc_v, mask=cache.cross_mask)
        x = self.encoder_attn_layer_norm(x + self.encoder_attn.output(attended))
        return self.final_layer_norm(x + linear(linear(x, self.fc1, self.act), self.fc2))


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


def check_length(length: int, config: BartConfig) -> None:
    """Encoder inputs and decoder sequences alike read learned positions: at most max_position_embeddings."""
    if length > config.max_position_embeddings:
        raise InvalidInput(f"BART's positions take at most {config.max_position_embeddings} tokens, not {length}: "
                           "shorten the input (truncation=True) or ask for fewer new tokens.")


class BartEncoder(nn.Module):
    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)  # tied to model.shared
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, config.d_model)
        self.layers = nn.ModuleList(BartEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layernorm_embedding = nn.LayerNorm(config.d_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) tokens -> (B, S, C) states; padded slots hold zeros (the decoder's cross_mask hides them)."""
        b, s = input_ids.shape
        check_length(s, self.config)
        # Positions count real tokens, so that a left-padded row reads the positions it would alone (right padding:
        # 0..n-1, as in transformers).
        positions = real_token_positions(attention_mask, s, input_ids.device) + POSITION_OFFSET  # (B or 1, S)
        x = _scaled(self.embed_tokens(input_ids), self.config) + self.embed_positions(positions)
        x = self.layernorm_embedding(x)
        batch = Unpadder(attention_mask, b, s)
        h = batch.unpad(x)  # (N, C)
        for layer in self.layers:
            h = layer(h, batch)
        return batch.pad(h)


def _scaled(embeddings: torch.Tensor, config: BartConfig) -> torch.Tensor:
    return embeddings if config.embed_scale == 1.0 else embeddings * config.embed_scale


class BartDecoder(nn.Module):
    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)  # tied to model.shared
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, config.d_model)
        self.layers = nn.ModuleList(BartDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm_embedding = nn.LayerNorm(config.d_model)

    def forward(self, tokens: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B, t, C) final hidden states."""
        t = tokens.shape[1]
        cache.check_room(t)
        positions = cache.positions(t) + POSITION_OFFSET  # (B, t), each row counting from its first real token
        x = _scaled(self.embed_tokens(tokens), self.config) + self.embed_positions(positions)
        x = self.layernorm_embedding(x)
        mask = cache.attention_mask(t)
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index, mask)
        cache.advance(t)
        return x


def new_cache(config: BartConfig, decoder: BartDecoder, rows: int, max_length: int, encoder_hidden: torch.Tensor,
              encoder_mask: torch.Tensor | None, static: bool) -> EncoderDecoderCache:
    """An empty decoder cache for `rows` sequences (a multiple of the encoder batch) holding each layer's
    cross-attention keys/values of `encoder_hidden` (B, S, C) and the encoder's padding mask (B, S) as cross_mask."""
    if encoder_hidden is None or encoder_hidden.dim() != 3:
        raise InvalidInput("BART's decoder needs encoder_hidden (batch, length, d_model) from model.encode().")
    batch, length = encoder_hidden.shape[:2]
    if rows % batch:
        raise InvalidInput(f"{rows} decoder rows cannot share {batch} encoder outputs: rows must be a multiple.")
    if encoder_mask is not None and tuple(encoder_mask.shape) != (batch, length):
        raise InvalidInput(f"the encoder attention mask has shape {tuple(encoder_mask.shape)}, the encoder output "
                           f"{(batch, length)} positions: they must match.")
    check_length(max_length, config)
    weight = decoder.embed_tokens.weight
    heads = config.decoder_attention_heads
    cache = EncoderDecoderCache(config.decoder_layers, rows, heads, config.d_model // heads, max_length,
                                dtype=weight.dtype, device=weight.device, static=static)
    encoder_hidden = encoder_hidden.to(weight.dtype)
    for index, layer in enumerate(decoder.layers):
        cache.cross[index] = layer.encoder_attn.keys_values(encoder_hidden)  # once per input, shared by its rows
    cache.cross_mask = padding_mask(None if encoder_mask is None else encoder_mask.to(weight.device))
    return cache


def shift_right(input_ids: torch.Tensor, start: int, padding: torch.Tensor | None) -> torch.Tensor:
    """Decoder inputs of BART's pretraining objective: the encoder tokens moved one slot right, `start` in front.

    padding: (B,) left-padding slots per row, or None. A left-padded row gets its start token just before its first
    real token (its padding slots keep pad tokens, masked by the cache), so it reads what it would alone."""
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = start
    if padding is not None:
        shifted[torch.arange(input_ids.shape[0], device=input_ids.device), padding] = start
    return shifted


def left_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) mask -> (B,) count of padding slots before each row's first real token; None without a mask."""
    return None if attention_mask is None else attention_mask.long().argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# Models


class BartModel(nn.Module):
    """Encoder and decoder without a head: the decoder's last hidden state (as transformers' BartModel)."""

    config_class = BartConfig
    base_model_prefix = "model"
    tied_weights = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = BartEncoder(config)
        self.decoder = BartDecoder(config)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            decoder_input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass -> (decoder states (B, T, C), encoder states (B, S, C)). Without decoder_input_ids,
        the decoder reads the encoder tokens shifted right (BART's denoising input, what classification uses)."""
        device = self.shared.weight.device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        encoder_hidden = self.encoder(input_ids, attention_mask)
        padding = None
        if decoder_input_ids is None:
            padding = left_padding(attention_mask)
            decoder_input_ids = shift_right(input_ids, self._start_token(), padding)
        decoder_input_ids = decoder_input_ids.to(device)
        cache = new_cache(self.config, self.decoder, decoder_input_ids.shape[0], decoder_input_ids.shape[1],
                          encoder_hidden, attention_mask, static=False)
        cache.set_left_padding(padding)
        return self.decoder(decoder_input_ids, cache), encoder_hidden

    def _start_token(self) -> int:
        start = self.config.decoder_start_token_id
        if start is None:
            raise UnsupportedModel("this BART config names no decoder_start_token_id; set it in config.json.")
        return start

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden, encoder_hidden = self.run(input_ids, attention_mask, decoder_input_ids)
        return {"last_hidden_state": hidden, "encoder_last_hidden_state": encoder_hidden}


class BartClassificationHead(nn.Module):
    def __init__(self, config: BartConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


def last_end_token(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos: int) -> torch.Tensor:
    """(B, T) -> (B,) the slot of each row's last end-of-sequence token among its real tokens.

    transformers reads the same slot (the last of the row's </s> tokens) but insists that every row of a batch has
    as many of them; any count works here."""
    is_end = input_ids == eos
    if attention_mask is not None:
        is_end &= attention_mask.bool()  # a pad token equal to eos is not an end
    if not bool(is_end.any(dim=1).all()):
        raise InvalidInput(f"every input must contain the end-of-sequence token (id {eos}): BART classifies from its "
                           "state. Tokenize with add_special_tokens=True.")
    t = input_ids.shape[1]
    return (t - 1) - is_end.flip(1).long().argmax(dim=1)


class BartForSequenceClassification(nn.Module):
    """BART with a classification head on the decoder state at each row's last </s> (bart-large-mnli)."""

    config_class = BartConfig
    base_model_prefix = "model"
    tied_weights = {"model.encoder.embed_tokens.weight": "model.shared.weight",
                    "model.decoder.embed_tokens.weight": "model.shared.weight"}

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        self.classification_head = BartClassificationHead(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, T) tokens of a text or text pair -> {"logits": (B, num_labels)}."""
        hidden, _ = self.model.run(input_ids, attention_mask)  # (B, T, C)
        ends = last_end_token(input_ids.to(hidden.device), None if attention_mask is None
                              else attention_mask.to(hidden.device), self.config.end_token)
        sentence = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]  # (B, C)
        return {"logits": self.classification_head(sentence)}


class BartForConditionalGeneration(nn.Module):
    """BART with its language-model head (`lm_head`, tied to model.shared, plus `final_logits_bias`): text to text.

    Decoding contract (see lightpipe.generation.generate): `encode`, `new_cache`, `decode_step`."""

    config_class = BartConfig
    base_model_prefix = "model"
    tied_weights = {"model.encoder.embed_tokens.weight": "model.shared.weight",
                    "model.decoder.embed_tokens.weight": "model.shared.weight",
                    "lm_head.weight": "model.shared.weight"}

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) tokens -> (B, S, C) encoder states; pass the same attention_mask to new_cache (or generate's
        encoder_attention_mask) so that the decoder ignores the padded slots."""
        device = self.lm_head.weight.device
        return self.model.encoder(input_ids.to(device), None if attention_mask is None else attention_mask.to(device))

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden: torch.Tensor | None = None,
                  static: bool = False, encoder_mask: torch.Tensor | None = None) -> EncoderDecoderCache:
        """An empty decoder cache for `rows` sequences (a multiple of the encoder batch: beams or samples of one
        input are adjacent rows) of up to `max_length` tokens; cross-attention keys/values computed here, once.
        encoder_mask: (B, S) 1 for real encoder tokens, 0 for padding. static: see generation/cache.py."""
        return new_cache(self.config, self.model.decoder, rows, max_length, encoder_hidden, encoder_mask, static)

    def decode_step(self, tokens: torch.Tensor, cache: EncoderDecoderCache, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> logits (B, t, V), or (B, 1, V) of the last position only."""
        hidden = self.model.decoder(tokens, cache)
        return vocab_logits(hidden[:, -1:] if last_only else hidden, self.lm_head) + self.final_logits_bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced logits (B, T, V) of every decoder position (the encoder tokens shifted right when
        decoder_input_ids are not given)."""
        hidden, encoder_hidden = self.model.run(input_ids, attention_mask, decoder_input_ids)
        logits = vocab_logits(hidden, self.lm_head) + self.final_logits_bias
        return {"logits": logits, "encoder_last_hidden_state": encoder_hidden}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give the encoder and decoder their token embeddings (checkpoints saved by transformers 5 keep only
    `model.shared`, older ones all three) and the generation head its `final_logits_bias` (zeros when absent, as
    transformers initialises it); drop fairseq's `version` buffers."""
    out = {k: v for k, v in state_dict.items() if not k.endswith(("encoder.version", "decoder.version"))}
    for prefix in ("model.", ""):
        shared = out.get(prefix + "shared.weight")
        if shared is None:
            shared = out.get(prefix + "encoder.embed_tokens.weight")
            if shared is None:
                continue
            out[prefix + "shared.weight"] = shared
        out.setdefault(prefix + "encoder.embed_tokens.weight", shared)
        out.setdefault(prefix + "decoder.embed_tokens.weight", shared)
        out.setdefault("final_logits_bias", shared.new_zeros(1, shared.shape[0]))
    return out


ARCHITECTURES = {
    "BartModel": BartModel,
    "BartForSequenceClassification": BartForSequenceClassification,
    "BartForConditionalGeneration": BartForConditionalGeneration,
}
HEADS = {
    "base": BartModel,
    "sequence-classification": BartForSequenceClassification,
    "seq2seq-lm": BartForConditionalGeneration,
}
Config = BartConfig
# Keys of the generation head that other heads find in a checkpoint and ignore.
IGNORED_KEYS = (r"^final_logits_bias$", r"^lm_head\.weight$")
NO_SPLIT_MODULES = ("BartEncoderLayer", "BartDecoderLayer")  # blocks a device_map places whole
