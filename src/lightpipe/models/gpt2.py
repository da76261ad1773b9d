"""GPT-2 (and distilgpt2): a decoder-only transformer with learned positions, run on lightpipe's decoding contract.

Attribute names equal the keys of Hugging Face GPT-2 checkpoints. Those store their projections as `Conv1D`
layers, (in, out) matrices; `sanitize` views them in nn.Linear's (out, in) shape without moving them, so every
product runs through `layers.linear`, and a batch-1 decode step reads them in the (in, out) layout it streams
fastest. Query, key and value stay fused in `c_attn` as the checkpoint has them: one product per layer and step
instead of three.

Decoding (see lightpipe.generation.generate): `new_cache`, then `decode_step` with the whole prompt (prefill) and
one token per row after that. Under left padding every row counts its positions from its first real token, as
transformers' `generate` does. `forward` is the same computation over a full sequence with a fresh cache.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from ..generation.cache import KVCache
from .layers import (Embedding, activation, by_input_rows, cached_attention, check_length, full_sequence_cache,
                     greedy_positions, linear, merge_heads, spare_rows, vocab_logits)


@dataclasses.dataclass
class GPT2Config(BaseConfig):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores divided by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also divided by (layer index + 1)
    reorder_and_upcast_attn: bool = False  # attention computed in float32 whatever the weights' dtype
    add_cross_attention: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        # transformers' generic attribute names, accepted where a config.json uses them instead.
        return {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                "max_position_embeddings": "n_positions"}

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UnsupportedModel(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).")
        if self.add_cross_attention:
            raise UnsupportedModel("GPT-2 with cross-attention (add_cross_attention=true, an encoder-decoder "
                                   "component) is not supported; lightpipe runs GPT-2 as a decoder-only model.")
        activation(self.activation_function)  # an unknown name fails at load time

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


# ----------------------------------------------------------------------------------------------
# Layers


class GPT2Attention(nn.Module):
    """Causal self-attention over the cache, with query, key and value from one fused projection."""

    def __init__(self, config: GPT2Config, layer_index: int):
        super().__init__()
        self.num_heads = config.n_head
        head_dim = config.n_embd // config.n_head
        self.scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_index + 1)
        self.upcast = config.reorder_and_upcast_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache, index: int, mask) -> torch.Tensor:
        """x: (B, t, C) the new positions -> (B, t, C)."""
        b, t, _ = x.shape
        qkv = linear(x, self.c_attn).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, t, D), strided views of one product
        k, v = cache.update(index, k, v)  # (B, H, S, D)
        if self.upcast and q.dtype != torch.float32:
            out = cached_attention(q.float(), k.float(), v.float(), mask, scale=self.scale).to(q.dtype)
        else:
            out = cached_attention(q, k, v, mask, scale=self.scale)
        return linear(merge_heads(out), self.c_proj)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.act = config.activation_function
        self.c_fc = nn.Linear(config.n_embd, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.c_fc, self.act), self.c_proj)


class GPT2Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache, index: int, mask) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, index, mask)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------
# Models


class GPT2Model(nn.Module):
    """The transformer without the language-model head: (B, T) tokens -> (B, T, C) hidden states."""

    config_class = GPT2Config
    base_model_prefix = "transformer"

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        if encoder_hidden is not None:
            raise InvalidInput("GPT-2 is decoder-only: it takes no encoder_hidden.")
        check_length(max_length, self.config.n_positions, "n_positions")
        weight = self.wte.weight
        heads = self.config.n_head
        return KVCache(self.config.n_layer, rows, heads, self.config.n_embd // heads, max_length,
                       dtype=weight.dtype, device=weight.device, static=static)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> final hidden states (B, t, C)."""
        t = tokens.shape[1]
        cache.check_room(t)
        x = self.wte(tokens) + self.wpe(cache.positions(t))  # (B, t, C)
        mask = cache.attention_mask(t)
        for index, block in enumerate(self.h):
            x = block(x, cache, index, mask)
        cache.advance(t)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"last_hidden_state": self.decode(input_ids.to(self.wte.weight.device), cache)}


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head (`lm_head`, tied to the token embeddings)."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    tied_weights = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        """An empty cache for `rows` sequences of up to `max_length` tokens (see KVCache for `static`)."""
        return self.transformer.new_cache(rows, max_length, encoder_hidden=encoder_hidden, static=static)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> logits (B, t, V), or (B, 1, V) of the last position only."""
        hidden = self.transformer.decode(tokens, cache)
        return vocab_logits(hidden[:, -1:] if last_only else hidden, self.lm_head)

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache, *, positions: int | None = None) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B,) the most likely next token of each row (or (B, positions):
        after each of the last `positions` tokens): the argmax of decode_step's logits, found without computing them
        all (layers.greedy_tokens)."""
        return greedy_positions(self.transformer.decode(tokens, cache), self.lm_head, positions)

    def spare_rows(self) -> int:
        return spare_rows(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits (B, T, V) of every position. Under left padding each row's positions start at its first real
        token (as in generation); padded positions' logits are meaningless."""
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"logits": self.decode_step(input_ids.to(self.lm_head.weight.device), cache)}


# Conv1D layers of Hugging Face checkpoints, stored (in, out).
_CONV1D = re.compile(r"(^|\.)(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# The token embeddings, which are also the language-model head, and an untied head.
_VOCABULARY = re.compile(r"(^|\.)wte\.weight$|^lm_head\.weight$")
# Causal-mask buffers older checkpoints saved beside the weights.
_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv1D weights become nn.Linear's (out, in) shape as views of the checkpoint's own (in, out) memory, the
    layout one-row decode steps read fastest; the token embeddings (the tied head) are laid out the same way; the
    saved causal-mask buffers are dropped. `lm_head.weight`, which checkpoints omit, comes from the tied token
    embeddings (see `tied_weights`)."""
    out = {}
    for key, tensor in state_dict.items():
        if _BUFFERS.search(key):
            continue
        if _CONV1D.search(key):
            tensor = tensor.t()
        elif _VOCABULARY.search(key):
            tensor = by_input_rows(tensor)
        out[key] = tensor
    return out
ARCHITECTURES = {
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPT2Model": GPT2Model,
}
HEADS = {
    "base": GPT2Model,
    "causal-lm": GPT2LMHeadModel,
}
TASK_OF_HEAD = {"causal-lm": "text-generation"}
Config = GPT2Config
NO_SPLIT_MODULES = ("GPT2Block",)  # blocks a device_map places whole
