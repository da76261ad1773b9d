"""Whisper's network: a log-mel audio encoder and a text decoder that reads it through cross-attention.

Attribute names equal the keys of Hugging Face Whisper checkpoints. The decoder runs one step at a time
against an explicit `EncoderDecoderCache` (models/layers.py): self-attention keys/values are appended step by
step, cross-attention keys/values are computed once per audio in `new_cache` and shared by all beams. How Whisper
decodes (prompts, languages, timestamps, the window loop over long audio, word timings) is lightpipe.whisper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .layers import (EncoderDecoderCache, Embedding, activation, cached_attention, clamp_half, cross_attention, linear,
                     merge_heads, split_heads, vocab_logits)


@dataclasses.dataclass
class WhisperConfig(BaseConfig):
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames after the stride-2 convolution: 30 s of audio
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False  # read for completeness: Whisper never scales its embeddings
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    decoder_start_token_id: int = 50257
    # Generation settings that checkpoints written before generation_config.json kept in config.json.
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_decoder_ids: list | None = None
    median_filter_width: int = 7  # smoothing of alignment weights for word timestamps

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise UnsupportedModel(f"d_model ({self.d_model}) must be a multiple of the attention heads ({heads}).")
        activation(self.activation_function)  # unknown names fail at load time

    @property
    def frames(self) -> int:
        """Log-mel frames the encoder takes: two per encoder position (3000 for 30 s)."""
        return 2 * self.max_source_positions


# ----------------------------------------------------------------------------------------------
# Layers

class WhisperAttention(nn.Module):
    """Multi-head attention. Keys have no bias. Queries are scaled before the dot product (in Whisper's
    order, which matters at float32 precision), so SDPA runs with scale 1."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scaling = (d_model // num_heads) ** -0.5
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D), pre-scaled."""
        return split_heads(linear(x, self.q_proj) * self.scaling, self.num_heads)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) -> keys and values, each (B, H, S, D)."""
        return split_heads(linear(x, self.k_proj), self.num_heads), split_heads(linear(x, self.v_proj), self.num_heads)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, C)."""
        return linear(merge_heads(heads), self.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bidirectional self-attention (the encoder's): (B, T, C) -> (B, T, C)."""
        k, v = self.keys_values(x)
        return self.output(F.scaled_dot_product_attention(self.queries(x), k, v, scale=1.0))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.act = config.activation_function
        self.self_attn = WhisperAttention(config.d_model, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + linear(linear(self.final_layer_norm(x), self.fc1, self.act), self.fc2)
        return clamp_half(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.act = config.activation_function
        self.self_attn = WhisperAttention(config.d_model, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = WhisperAttention(config.d_model, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, cache: EncoderDecoderCache, index: int, mask, heads: list[int] | None):
        """x: (B, t, C) the new positions -> (B, t, C), and the chosen heads' cross-attention weights or None."""
        h = self.self_attn_layer_norm(x)
        k, v = cache.update(index, *self.self_attn.keys_values(h))  # (B, H, length + t, D)
        x = x + self.self_attn.output(cached_attention(self.self_attn.queries(h), k, v, mask, scale=1.0))
        enc_k, enc_v = cache.cross[index]
        h = self.encoder_attn_layer_norm(x)
        attended, weights = cross_attention(self.encoder_attn.queries(h), enc_k, enc_v, scale=1.0, heads=heads)
        x = x + self.encoder_attn.output(attended)
        x = x + linear(linear(self.final_layer_norm(x), self.fc1, self.act), self.fc2)
        return x, weights


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = Embedding(config.max_source_positions, config.d_model)  # sinusoids, stored
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, 2 * max_source_positions) log-mel features -> (B, max_source_positions, C)."""
        check_features(input_features, self.config)
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, C, S)
        x = x.transpose(1, 2) + self.embed_positions.weight  # (B, S, C)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def check_features(features: torch.Tensor, config: WhisperConfig) -> None:
    expected = (config.num_mel_bins, config.frames)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or tuple(features.shape[1:]) != expected:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidInput(
            f"Whisper takes log-mel features of shape (batch, {expected[0]}, {expected[1]}), not {shape}: pad or cut "
            f"the audio to {config.frames // 100} s before computing features."
        )


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)
        self.embed_positions = Embedding(config.max_target_positions, config.d_model)  # learned
        self.layers = nn.ModuleList(WhisperDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, tokens: torch.Tensor, cache: EncoderDecoderCache, positions: torch.Tensor | None = None,
                alignment_heads: Sequence[tuple[int, int]] | None = None):
        """tokens (B, t) -> hidden states (B, t, C), and (B, len(alignment_heads), t, S) cross-attention
        probabilities of the (layer, head) pairs asked for (None without)."""
        t = tokens.shape[1]
        cache.check_room(t)
        if positions is None:
            positions = cache.positions(t)
        x = self.embed_tokens(tokens) + self.embed_positions.weight[positions]  # (B, t, C)
        mask = cache.attention_mask(t)
        by_layer: dict[int, list[int]] = {}
        for layer, head in alignment_heads or ():
            by_layer.setdefault(layer, []).append(head)
        collected = {}
        for index, layer in enumerate(self.layers):
            x, weights = layer(x, cache, index, mask, by_layer.get(index))
            if weights is not None:
                collected[index] = weights
        cache.advance(t)
        if alignment_heads is None:
            return self.layer_norm(x), None
        picked = [collected[layer][:, by_layer[layer].index(head)] for layer, head in alignment_heads]
        return self.layer_norm(x), torch.stack(picked, dim=1)


# ----------------------------------------------------------------------------------------------
# Models


class WhisperModel(nn.Module):
    """Encoder and decoder without the language-model head: returns the decoder's last hidden state."""

    config_class = WhisperConfig
    base_model_prefix = "model"

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder_hidden = self.encoder(input_features)
        cache = _new_cache(self.config, self.decoder, decoder_input_ids.shape[0], decoder_input_ids.shape[1],
                           encoder_hidden, static=False)
        hidden, _ = self.decoder(decoder_input_ids, cache)
        return {"last_hidden_state": hidden, "encoder_last_hidden_state": encoder_hidden}


def _new_cache(config: WhisperConfig, decoder: WhisperDecoder, rows: int, max_length: int,
               encoder_hidden: torch.Tensor, static: bool) -> EncoderDecoderCache:
    if encoder_hidden is None or encoder_hidden.dim() != 3:
        raise InvalidInput("Whisper's decoder needs encoder_hidden (batch, frames, d_model) from model.encode().")
    batch = encoder_hidden.shape[0]
    if rows % batch:
        raise InvalidInput(f"{rows} decoder rows cannot share {batch} encoder outputs: rows must be a multiple.")
    if max_length > config.max_target_positions:
        raise InvalidInput(f"Whisper decodes at most {config.max_target_positions} tokens, not {max_length}.")
    weight = decoder.embed_tokens.weight
    heads = config.decoder_attention_heads
    cache = EncoderDecoderCache(config.decoder_layers, rows, heads, config.d_model // heads, max_length,
                                dtype=weight.dtype, device=weight.device, static=static)
    encoder_hidden = encoder_hidden.to(weight.dtype)
    for index, layer in enumerate(decoder.layers):
        # Once per audio, shared by its rows; contiguous, so that attention does not copy them at every step.
        k, v = layer.encoder_attn.keys_values(encoder_hidden)
        cache.cross[index] = (k.contiguous(), v.contiguous())
    return cache


class WhisperForConditionalGeneration(nn.Module):
    """Whisper with its language-model head (`proj_out`, tied to the token embeddings): speech to text.

    Decoding contract (see lightpipe.generation.generate): `encode`, `new_cache`, `decode_step`.
    """

    config_class = WhisperConfig
    base_model_prefix = "model"
    tied_weights = {"proj_out.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.model = WhisperModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        return self.config.max_target_positions

    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, frames) log-mel features -> (B, max_source_positions, C) encoder states."""
        return self.model.encoder(input_features)

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden: torch.Tensor | None = None,
                  static: bool = False) -> EncoderDecoderCache:
        """An empty decoder cache for `rows` sequences (a multiple of the encoder batch: beams or samples of one
        audio are adjacent rows) of up to `max_length` tokens; cross-attention keys/values computed here, once.
        static: attention reads all max_length slots (fixed shapes per step, see generation/cache.py)."""
        return _new_cache(self.config, self.model.decoder, rows, max_length, encoder_hidden, static)

    def decode_step(self, tokens: torch.Tensor, cache: EncoderDecoderCache, positions: torch.Tensor | None = None, *,
                    alignment_heads: Sequence[tuple[int, int]] | None = None, last_only: bool = False):
        """tokens (B, t) appended to the cache -> logits (B, t, V) (only the last position's, (B, 1, V), with
        last_only). With alignment_heads, returns (logits, (B, len(alignment_heads), t, S) cross-attention
        probabilities of those (layer, head) pairs)."""
        hidden, weights = self.model.decoder(tokens, cache, positions, alignment_heads)
        if last_only:
            hidden = hidden[:, -1:]
        logits = vocab_logits(hidden, self.proj_out)
        return logits if alignment_heads is None else (logits, weights)

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced logits (B, T, V) of every decoder position (no generation)."""
        encoder_hidden = self.encode(input_features)
        cache = self.new_cache(decoder_input_ids.shape[0], decoder_input_ids.shape[1], encoder_hidden=encoder_hidden)
        return {"logits": self.decode_step(decoder_input_ids, cache), "encoder_last_hidden_state": encoder_hidden}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Whisper checkpoints already use these names; `proj_out.weight`, when a checkpoint omits it,
    comes from the tied token embeddings (see `tied_weights`)."""
    return state_dict


ARCHITECTURES = {
    "WhisperForConditionalGeneration": WhisperForConditionalGeneration,
    "WhisperModel": WhisperModel,
}
HEADS = {
    "speech-seq2seq": WhisperForConditionalGeneration,
    "base": WhisperModel,
}
Config = WhisperConfig
NO_SPLIT_MODULES = ("WhisperEncoderLayer", "WhisperDecoderLayer")  # blocks a device_map places whole
