"""T5 (t5-small ... t5-11b, t5-v1.1, flan-t5): a pre-norm encoder-decoder transformer with relative positions.

Attribute names equal the keys of Hugging Face T5 checkpoints. What sets T5 apart:
- no position embeddings: each attention score gets a learned bias per head, looked up by the bucket of the
  distance key - query (exact for short distances, log-spaced up to relative_attention_max_distance). Buckets are
  bidirectional in the encoder and causal in the decoder; the first block's table serves every block of its stack;
  cross-attention has no bias;
- no scaling of the attention scores (the 1/sqrt(d) is folded into the trained weights);
- "T5LayerNorm": RMS normalisation without mean subtraction and without bias, before every sub-layer, plus one
  after each stack;
- the feed-forward is ReLU (t5) or gated: act(wi_0 x) * wi_1 x (flan-t5 / t5-v1.1: "gated-gelu", tanh GELU);
- the decoder's output is scaled by d_model**-0.5 before the LM head when config.json ties the word embeddings
  (original T5; t5-v1.1 and flan-t5 untie them and have their own lm_head). transformers 5 writes this choice as
  `scale_decoder_outputs`; older configs say it with `tie_word_embeddings`;
- the decoder starts from the pad token (decoder_start_token_id = 0).

The decoder runs against an explicit `T5Cache` (an EncoderDecoderCache, models/layers.py): cross-attention
keys/values and the encoder's padding mask are computed once per input in `new_cache`, and so is the decoder's
causal position bias for every (query, key) slot pair the cache can hold; a decode step slices it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .layers import (EncoderDecoderCache, Embedding, FusedProjection, activation, cross_attention, linear,
                     merge_heads, padding_mask, split_heads, vocab_logits)


@dataclasses.dataclass
class T5Config(BaseConfig):
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head size; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu", "gated-gelu", "gated-silu", ...
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = None  # None: the pad token, as T5 was trained
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings decides (configs before transformers 5)

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UnsupportedModel(f"feed_forward_proj {self.feed_forward_proj!r} is not valid: use an activation "
                                   "name ('relu') or 'gated-' and one ('gated-gelu').")
        activation(self.activation_name)  # an unknown name fails at load time

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        # flan-t5 and t5-v1.1 were trained with the tanh approximation that "gated-gelu" stands for.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name

    @property
    def scales_output(self) -> bool:
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

    @property
    def start_token(self) -> int:
        start = self.decoder_start_token_id if self.decoder_start_token_id is not None else self.pad_token_id
        if start is None:
            raise UnsupportedModel("this T5 config names neither decoder_start_token_id nor pad_token_id; set one "
                                   "in config.json.")
        return start


# ----------------------------------------------------------------------------------------------
# Relative positions


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """key_pos - query_pos (any shape, long) -> bucket ids in [0, num_buckets).

    Half of the buckets count small distances exactly, the other half cover distances up to max_distance on a log
    scale (farther ones share the last bucket). Bidirectional: keys after the query take the upper half of the
    buckets. Causal: only keys at or before the query are told apart (later ones are masked anyway)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # distance 0 gives log(0) = -inf here; torch.where picks the exact bucket for it.
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


# ----------------------------------------------------------------------------------------------
# Layers


class T5LayerNorm(nn.Module):
    """x / rms(x) * weight: no mean subtraction, no bias. The mean of squares is taken in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5Attention(nn.Module):
    """Multi-head attention without biases and without score scaling; the first block of a stack also holds the
    relative position bias table (relative_attention_bias: (buckets, heads))."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads)
        self._qkv = FusedProjection()
        self._kv = FusedProjection()

    def position_bias(self, queries: torch.Tensor, keys: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        """(t,) query positions and (S,) key positions -> (1, H, t, S) score biases."""
        buckets = relative_position_bucket(keys[None, :] - queries[:, None], bidirectional, self.num_buckets,
                                           self.max_distance)  # (t, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def self_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> queries, keys, values, each (B, H, T, D), from one matrix product (strided views)."""
        b, t, _ = x.shape
        qkv = linear(x, self._qkv.refresh((self.q, self.k, self.v)))  # (B, T, 3 * H * D)
        return qkv.view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) encoder states -> keys and values, each (B, H, S, D), contiguous (read at every step)."""
        b, s, _ = x.shape
        kv = linear(x, self._kv.refresh((self.k, self.v))).view(b, s, 2, self.num_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k.contiguous(), v.contiguous()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D)."""
        return split_heads(linear(x, self.q), self.num_heads)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, C)."""
        return linear(merge_heads(heads), self.o)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Unscaled attention with an additive bias that also carries the mask (-inf where not attended):
    (B, H, t, D) queries over (B, H, S, D) keys/values, bias broadcastable to (B, H, t, S) -> (B, H, t, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)


class T5DenseActDense(nn.Module):
    """wo(act(wi x)), or with a gated activation wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = config.activation_name
        if config.is_gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wi"):
            return linear(linear(x, self.wi, self.act), self.wo)
        return linear(linear(x, self.wi_0, self.act).mul_(linear(x, self.wi_1)), self.wo)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5EncoderBlock(nn.Module):
    """Pre-norm: x += attention(norm(x)); x += ff(norm(x))."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, S, C), bias (B or 1, H, S, S) -> (B, S, C)."""
        sub = self.layer[0]
        q, k, v = sub.SelfAttention.self_heads(sub.layer_norm(x))
        x = x + sub.SelfAttention.output(biased_attention(q, k, v, bias))
        return self.layer[1](x)


class T5DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention over the cache, cross-attention over the encoder output, feed-forward."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias), T5LayerCrossAttention(config),
                                    T5LayerFF(config)])

    def forward(self, x: torch.Tensor, cache: "T5Cache", index: int, bias: torch.Tensor) -> torch.Tensor:
        """x (B, t, C) the new positions, bias (B or 1, H, t, S) -> (B, t, C)."""
        own, cross = self.layer[0], self.layer[1]
        q, k, v = own.SelfAttention.self_heads(own.layer_norm(x))
        k, v = cache.update(index, k, v)  # (B, H, length + t, D)
        x = x + own.SelfAttention.output(biased_attention(q, k, v, bias))
        enc_k, enc_v = cache.cross[index]
        queries = cross.EncDecAttention.queries(cross.layer_norm(x))
        attended, _ = cross_attention(queries, enc_k, enc_v, scale=1.0, mask=cache.cross_mask)
        x = x + cross.EncDecAttention.output(attended)
        return self.layer[2](x)


# ----------------------------------------------------------------------------------------------
# Encoder, decoder and their cache


class T5Cache(EncoderDecoderCache):
    """An EncoderDecoderCache that also holds the decoder's self-attention bias for every (query slot, key slot)
    pair it can hold: (1, H, max_length, max_length), -inf above the diagonal (the causal mask). A decode step
    reads its rows [length, length + t) instead of looking up buckets again."""

    position_bias: torch.Tensor | None = None

    def step_bias(self, t: int) -> torch.Tensor:
        """(B or 1, H, t, S) bias of the next t queries over the keys `update` returns."""
        end = self.length + t
        bias = self.position_bias[:, :, self.length:end, :self.max_length if self.static else end]
        if self.padding is not None:  # a left-padded decoder prompt: hide each row's padding slots too
            mask, _ = self.attention_mask(t)  # (B, 1, t, S) boolean
            bias = bias.masked_fill(~mask, float("-inf"))
        return bias


class T5Encoder(nn.Module):
    """The encoder stack (keys encoder.block.{i}..., encoder.final_layer_norm); token embeddings are the model's
    `shared` table."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5EncoderBlock(config, has_relative_bias=i == 0) for i in range(config.num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, S, C) embedded tokens, attention_mask (B, S) 1/0 -> (B, S, C)."""
        s = x.shape[1]
        slots = torch.arange(s, device=x.device)
        # Relative positions only: right or left padding leaves the distances between real tokens unchanged.
        bias = self.block[0].layer[0].SelfAttention.position_bias(slots, slots, bidirectional=True)  # (1, H, S, S)
        mask = padding_mask(attention_mask)  # (B, 1, 1, S) or None
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))  # (B, H, S, S)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Decoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5DecoderBlock(config, has_relative_bias=i == 0)
                                   for i in range(config.decoder_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, cache: T5Cache) -> torch.Tensor:
        """x (B, t) embedded new tokens appended to the cache -> (B, t, C) final hidden states."""
        t = x.shape[1]
        cache.check_room(t)
        bias = cache.step_bias(t)
        for index, block in enumerate(self.block):
            x = block(x, cache, index, bias)
        cache.advance(t)
        return self.final_layer_norm(x)

    def causal_bias(self, length: int, device) -> torch.Tensor:
        """(1, H, length, length) self-attention bias of every query slot over every key slot, -inf for later keys."""
        slots = torch.arange(length, device=device)
        bias = self.block[0].layer[0].SelfAttention.position_bias(slots, slots, bidirectional=False)
        later = slots[None, :] > slots[:, None]  # (length, length)
        return bias.masked_fill(later, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Models


class T5Model(nn.Module):
    """Encoder and decoder without a head: the decoder's last hidden state (as transformers' T5Model)."""

    config_class = T5Config
    base_model_prefix = "transformer"  # T5 checkpoints of every head share top-level keys

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Encoder(config)
        self.decoder = T5Decoder(config)

    @property
    def max_positions(self) -> None:
        return None  # relative positions: no table bounds the length

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) tokens -> (B, S, C) encoder states; pass the same attention_mask to new_cache (or generate's
        encoder_attention_mask) so that the decoder ignores the padded slots."""
        device = self.shared.weight.device
        mask = None if attention_mask is None else attention_mask.to(device)
        return self.encoder(self.shared(input_ids.to(device)), mask)

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden: torch.Tensor | None = None,
                  static: bool = False, encoder_mask: torch.Tensor | None = None) -> T5Cache:
        """An empty decoder cache for `rows` sequences (a multiple of the encoder batch: beams or samples of one
        input are adjacent rows) of up to `max_length` tokens; cross-attention keys/values of `encoder_hidden`
        (B, S, C) computed here, once. encoder_mask: (B, S) 1 for real encoder tokens, 0 for padding."""
        if encoder_hidden is None or encoder_hidden.dim() != 3:
            raise InvalidInput("T5's decoder needs encoder_hidden (batch, length, d_model) from model.encode().")
        batch, length = encoder_hidden.shape[:2]
        if rows % batch:
            raise InvalidInput(f"{rows} decoder rows cannot share {batch} encoder outputs: rows must be a multiple.")
        if encoder_mask is not None and tuple(encoder_mask.shape) != (batch, length):
            raise InvalidInput(f"the encoder attention mask has shape {tuple(encoder_mask.shape)}, the encoder "
                               f"output {(batch, length)} positions: they must match.")
        config, weight = self.config, self.shared.weight
        cache = T5Cache(config.decoder_layers, rows, config.num_heads, config.d_kv, max_length, dtype=weight.dtype,
                        device=weight.device, static=static)
        encoder_hidden = encoder_hidden.to(device=weight.device, dtype=weight.dtype)
        for index, block in enumerate(self.decoder.block):
            cache.cross[index] = block.layer[1].EncDecAttention.keys_values(encoder_hidden)  # shared by its rows
        cache.cross_mask = padding_mask(None if encoder_mask is None else encoder_mask.to(weight.device))
        cache.position_bias = self.decoder.causal_bias(max_length, weight.device)
        return cache

    def decoder_states(self, tokens: torch.Tensor, cache: T5Cache) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B, t, C) the decoder's final hidden states."""
        return self.decoder(self.shared(tokens.to(self.shared.weight.device)), cache)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            decoder_input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass -> (decoder states (B, T, C), encoder states (B, S, C))."""
        if decoder_input_ids is None:
            raise InvalidInput("T5 needs decoder_input_ids for a full forward pass (start them with the "
                               f"decoder start token, id {self.config.start_token}); use generate() to produce text.")
        encoder_hidden = self.encode(input_ids, attention_mask)
        cache = self.new_cache(decoder_input_ids.shape[0], decoder_input_ids.shape[1], encoder_hidden=encoder_hidden,
                               encoder_mask=attention_mask)
        return self.decoder_states(decoder_input_ids, cache), encoder_hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden, encoder_hidden = self.run(input_ids, attention_mask, decoder_input_ids)
        return {"last_hidden_state": hidden, "encoder_last_hidden_state": encoder_hidden}


class T5ForConditionalGeneration(T5Model):
    """T5 with its language-model head: text to text.

    Decoding contract (see lightpipe.generation.generate): `encode`, `new_cache`, `decode_step`."""

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) decoder states -> (..., V)."""
        if self.config.scales_output:  # original T5 shares its output matrix with the input embeddings
            hidden = hidden * self.config.d_model ** -0.5
        return vocab_logits(hidden, self.lm_head)

    def decode_step(self, tokens: torch.Tensor, cache: T5Cache, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> logits (B, t, V), or (B, 1, V) of the last position only."""
        hidden = self.decoder_states(tokens, cache)
        return self.logits(hidden[:, -1:] if last_only else hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced logits (B, T, V) of every decoder position."""
        hidden, encoder_hidden = self.run(input_ids, attention_mask, decoder_input_ids)
        return {"logits": self.logits(hidden), "encoder_last_hidden_state": encoder_hidden}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One token table: `shared` (older checkpoints also store it as encoder/decoder.embed_tokens, which are
    dropped). The LM head reads `shared` when the checkpoint has no lm_head of its own (tied checkpoints saved by
    transformers). Dropped too: the unused cross-attention bias table some original T5 checkpoints carry."""
    out = dict(state_dict)
    for stack in ("encoder", "decoder"):
        table = out.pop(f"{stack}.embed_tokens.weight", None)
        if table is not None:
            out.setdefault("shared.weight", table)
    out.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    if "shared.weight" in out:
        out.setdefault("lm_head.weight", out["shared.weight"])
    return out


ARCHITECTURES = {
    "T5Model": T5Model,
    "T5ForConditionalGeneration": T5ForConditionalGeneration,
}
HEADS = {
    "base": T5Model,
    "seq2seq-lm": T5ForConditionalGeneration,
}
Config = T5Config
# The LM head's matrix, which the base model finds in a checkpoint (or sanitize adds) and ignores.
IGNORED_KEYS = (r"^lm_head\.weight$",)
NO_SPLIT_MODULES = ("T5EncoderBlock", "T5DecoderBlock")  # blocks a device_map places whole
