"""OPT (facebook/opt-125m ... opt-66b): a decoder-only transformer with learned positions, run on lightpipe's
decoding contract.

Attribute names equal the keys of Hugging Face OPT checkpoints. What sets OPT apart from GPT-2:
- positions count real tokens only (each left-padded row starts at 0) and index a table offset by 2, a
  leftover of fairseq's padding index;
- `do_layer_norm_before=False` (opt-350m) makes every block post-norm, with no final layer norm;
- `word_embed_proj_dim` smaller than `hidden_size` (opt-350m) adds `project_in` after the token embeddings and
  `project_out` before the (tied) language-model head;
- `enable_bias` and `layer_norm_elementwise_affine` drop the linear biases and the layer-norm weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from ..generation.cache import KVCache
from .layers import (Embedding, FusedProjection, activation, by_input_rows, cached_attention, check_length,
                     full_sequence_cache, greedy_positions, linear, merge_heads, spare_rows, vocab_logits)

POSITION_OFFSET = 2  # position p reads row p + 2 of embed_positions


@dataclasses.dataclass
class OPTConfig(BaseConfig):
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    num_attention_heads: int = 12
    activation_function: str = "relu"
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # "_remove_final_layer_norm" in config.json
    word_embed_proj_dim: int | None = None  # None: hidden_size
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        return {"_remove_final_layer_norm": "remove_final_layer_norm"}

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModel(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                   f"({self.num_attention_heads}).")
        activation(self.activation_function)  # an unknown name fails at load time

    @property
    def projected(self) -> bool:
        """Token embeddings narrower than the hidden states (opt-350m): project_in / project_out exist."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


# ----------------------------------------------------------------------------------------------
# Layers


class OPTAttention(nn.Module):
    """Causal self-attention over the cache. Queries are scaled after their projection, in OPT's order. Queries, keys
    and values come from one product (layers.FusedProjection): one 3C-wide matrix streams ~30% faster than three
    C-wide ones in a batch-1 decode step."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        dim, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.scaling = (dim // self.num_heads) ** -0.5
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self._qkv = FusedProjection()

    def forward(self, x: torch.Tensor, cache: KVCache, index: int, mask) -> torch.Tensor:
        """x: (B, t, C) the new positions -> (B, t, C)."""
        b, t, _ = x.shape
        qkv = linear(x, self._qkv.refresh((self.q_proj, self.k_proj, self.v_proj)))
        q, k, v = qkv.view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, t, D)
        k, v = cache.update(index, k, v)  # (B, H, S, D)
        return linear(merge_heads(cached_attention(q * self.scaling, k, v, mask, scale=1.0)), self.out_proj)


class OPTDecoderLayer(nn.Module):
    """Pre-norm (layer norms before attention and MLP) or, with do_layer_norm_before=False, post-norm."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        dim, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.act = config.activation_function
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.fc1 = nn.Linear(dim, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, dim, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, self.act), self.fc2)

    def forward(self, x: torch.Tensor, cache: KVCache, index: int, mask) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), cache, index, mask)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, cache, index, mask))
        return self.final_layer_norm(x + self.mlp(x))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        if config.projected:
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        affine = config.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine) \
            if config.has_final_layer_norm else None

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B, t, word_embed_proj_dim) final hidden states."""
        t = tokens.shape[1]
        cache.check_room(t)
        x = self.embed_tokens(tokens)  # (B, t, E)
        if self.project_in is not None:
            x = linear(x, self.project_in)
        # cache.positions counts each row's real tokens from 0, as OPT's mask-derived positions do.
        x = x + self.embed_positions(cache.positions(t) + POSITION_OFFSET)  # (B, t, C)
        mask = cache.attention_mask(t)
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index, mask)
        cache.advance(t)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = linear(x, self.project_out)
        return x


# ----------------------------------------------------------------------------------------------
# Models


def _new_cache(config: OPTConfig, decoder: OPTDecoder, rows: int, max_length: int, encoder_hidden,
               static: bool) -> KVCache:
    if encoder_hidden is not None:
        raise InvalidInput("OPT is decoder-only: it takes no encoder_hidden.")
    check_length(max_length, config.max_position_embeddings, "max_position_embeddings")
    weight = decoder.embed_tokens.weight
    heads = config.num_attention_heads
    return KVCache(config.num_hidden_layers, rows, heads, config.hidden_size // heads, max_length,
                   dtype=weight.dtype, device=weight.device, static=static)


class OPTModel(nn.Module):
    """The decoder without the language-model head: (B, T) tokens -> (B, T, word_embed_proj_dim)."""

    config_class = OPTConfig
    base_model_prefix = "model"

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        return _new_cache(self.config, self.decoder, rows, max_length, encoder_hidden, static)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"last_hidden_state": self.decoder(input_ids.to(self.decoder.embed_tokens.weight.device), cache)}


class OPTForCausalLM(nn.Module):
    """OPT with its language-model head (`lm_head`, tied to the token embeddings)."""

    config_class = OPTConfig
    base_model_prefix = "model"
    tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        """An empty cache for `rows` sequences of up to `max_length` tokens (see KVCache for `static`)."""
        return self.model.new_cache(rows, max_length, encoder_hidden=encoder_hidden, static=static)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> logits (B, t, V), or (B, 1, V) of the last position only."""
        hidden = self.model.decoder(tokens, cache)
        return vocab_logits(hidden[:, -1:] if last_only else hidden, self.lm_head)

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache, *, positions: int | None = None) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B,) the most likely next token of each row (or (B, positions):
        after each of the last `positions` tokens): the argmax of decode_step's logits, found without computing them
        all (layers.greedy_tokens)."""
        return greedy_positions(self.model.decoder(tokens, cache), self.lm_head, positions)

    def spare_rows(self) -> int:
        return spare_rows(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits (B, T, V) of every position; padded positions' logits are meaningless."""
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"logits": self.decode_step(input_ids.to(self.lm_head.weight.device), cache)}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face OPT checkpoints already use these names. Every matrix (the linear layers, the token embeddings
    that are also the tied head) is laid out (in, out) in memory, the layout a batch-1 decode step reads fastest
    (see layers.linear); the position table stays as it is. Checkpoints of the base model (keys under `decoder.`)
    gain the `model.` prefix in the loader, and `lm_head.weight`, which they omit, comes from the tied token
    embeddings (see `tied_weights`)."""
    return {key: by_input_rows(tensor) if tensor.dim() == 2 and "embed_positions" not in key else tensor
            for key, tensor in state_dict.items()}


ARCHITECTURES = {
    "OPTForCausalLM": OPTForCausalLM,
    "OPTModel": OPTModel,
}
HEADS = {
    "base": OPTModel,
    "causal-lm": OPTForCausalLM,
}
TASK_OF_HEAD = {"causal-lm": "text-generation"}
Config = OPTConfig
NO_SPLIT_MODULES = ("OPTDecoderLayer",)  # blocks a device_map places whole
