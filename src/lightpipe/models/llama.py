"""The Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral and Qwen2 - one decoder-only layout, run on lightpipe's
decoding contract.

Every layer is pre-norm: x + attention(RMSNorm(x)), then x + SwiGLU-MLP(RMSNorm(x)). Attention uses rotary
position embeddings (RoPE) and grouped-query attention (fewer key/value heads than query heads). The members of
the family differ only in details read from config.json:

- Llama: `attention_bias` (q/k/v/o biases), `mlp_bias`, and RoPE scaling (`rope_parameters`, or `rope_scaling`
  with `rope_theta` beside it in configs written before transformers 5): none, "linear", "dynamic" (NTK, the
  frequencies depend on the sequence length) or "llama3" (low/high frequency bands).
- Mistral: a sliding window of attention (`sliding_window`, on in every layer).
- Qwen2: always q/k/v biases, no o_proj bias; a sliding window only with `use_sliding_window`, and then only in
  the layers `layer_types` (or `max_window_layers`) names.

Attribute names equal the keys of Hugging Face checkpoints (model.layers.0.self_attn.q_proj ...). A decode step
is bound by reading the weights and by the number of calls: at inference q/k/v run as one product and gate/up as
another (layers.FusedProjection), and `sanitize` lays every matrix out (in, out) in memory, which a batch-1 step
streams fastest (see layers.linear).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from ..generation.cache import KVCache
from .layers import (Embedding, FusedProjection, activation, by_input_rows, cached_attention,
                     derived_copy, full_sequence_cache, greedy_positions, linear, merge_heads, spare_rows, vocab_logits)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DEFAULT_ROPE_THETA = 10000.0
MISTRAL_SLIDING_WINDOW = 4096  # transformers' MistralConfig default, for a config.json that leaves it out
QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


@dataclasses.dataclass
class LlamaConfig(BaseConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # transformers' default for this family (SmolLM's config.json says true)
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float | None = None  # before transformers 5, beside rope_scaling
    rope_scaling: dict | None = None  # before transformers 5
    rope_parameters: dict | None = None  # transformers 5: {"rope_type", "rope_theta", "factor", ...}
    partial_rotary_factor: float | None = None
    sliding_window: int | None = None
    use_sliding_window: bool = False  # Qwen2
    max_window_layers: int = QWEN2_MAX_WINDOW_LAYERS  # Qwen2
    layer_types: list[str] | None = None  # Qwen2: "full_attention" / "sliding_attention" per layer

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        if raw.get("model_type") == "mistral" and "sliding_window" not in raw:
            raw = {**raw, "sliding_window": MISTRAL_SLIDING_WINDOW}
        return super().from_dict(raw)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise UnsupportedModel(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                   f"({self.num_attention_heads}) when config.json gives no head_dim.")
        if self.num_attention_heads % self.kv_heads:
            raise UnsupportedModel(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                   f"num_key_value_heads ({self.kv_heads}).")
        if self.partial_rotary_factor not in (None, 1.0):
            raise UnsupportedModel(f"partial_rotary_factor={self.partial_rotary_factor} is not supported for "
                                   f"{self.model_type or 'llama'}; lightpipe rotates whole heads (factor 1.0).")
        activation(self.hidden_act)  # an unknown name fails at load time
        self.rope()  # an unsupported RoPE scaling fails at load time
        for window in self.layer_windows():
            if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
                raise UnsupportedModel(f"sliding_window must be a positive number of tokens, not {window!r}.")

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return True if self.model_type == "qwen2" else self.attention_bias

    @property
    def output_bias(self) -> bool:
        return False if self.model_type == "qwen2" else self.attention_bias

    def layer_windows(self) -> list[int | None]:
        """Per layer, the sliding window of attention (a key at most window - 1 slots before the query), or None."""
        n = self.num_hidden_layers
        if self.model_type == "mistral":
            return [self.sliding_window] * n
        if self.model_type == "qwen2":
            window = self.sliding_window if self.use_sliding_window else None
            if window is None:
                return [None] * n
            types = self.layer_types or ["sliding_attention" if i >= self.max_window_layers else "full_attention"
                                         for i in range(n)]
            return [window if kind == "sliding_attention" else None for kind in types]
        return [None] * n

    def rope(self) -> dict[str, Any]:
        """The RoPE settings as transformers 5 standardises them: rope_type, rope_theta and the type's numbers.
        rope_scaling (older configs) wins over rope_parameters; rope_theta inside the dict over the one beside."""
        settings = dict(self.rope_scaling or self.rope_parameters or {})
        settings.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else DEFAULT_ROPE_THETA)
        settings.setdefault("rope_type", settings.get("type", "default"))
        kind = settings["rope_type"]
        if kind not in ROPE_TYPES:
            raise UnsupportedModel(f"RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
        if kind != "default" and not isinstance(settings.get("factor"), (int, float)):
            raise UnsupportedModel(f"RoPE scaling {kind!r} needs a numeric 'factor' in rope_parameters.")
        if kind == "llama3":
            settings.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            for key in ("low_freq_factor", "high_freq_factor"):
                if not isinstance(settings.get(key), (int, float)):
                    raise UnsupportedModel(f"RoPE scaling 'llama3' needs a numeric {key!r} in rope_parameters.")
        return settings


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def inverse_frequencies(rope: dict[str, Any], dim: int, max_positions: int, seq_len: int | None = None) -> torch.Tensor:
    """(dim/2,) float32 rotation speeds of RoPE, as transformers computes them for each scaling type.

    seq_len matters only for "dynamic" (NTK) scaling: past max_positions the base grows with the sequence.
    """
    base = rope["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # (dim/2,)
    kind = rope["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > max_positions:
        # Computed in float32 tensors, as transformers does with a tensor sequence length.
        factor = rope["factor"]
        grown = factor * torch.tensor(seq_len) / max_positions - (factor - 1)
        return 1.0 / ((base * grown ** (dim / (dim - 2))) ** exponents)
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < context / high) * ~(wavelength > context / low)
    return torch.where(medium, blended, scaled)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(...) positions -> (..., 2D) float32 [cos | signed sin] rows, D = 2 * len(inv_freq).

    The sine's first half is negated so that rotating needs no negation (see apply_rope)."""
    freqs = positions[..., None].float() * inv_freq  # (..., D/2), the same product as transformers'
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., D)
    sin = angles.sin()
    half = inv_freq.shape[0]
    return torch.cat((angles.cos(), -sin[..., :half], sin[..., half:]), dim=-1)


class RotaryEmbedding:
    """cos/sin of every position, computed once into a table (float32 math, stored in the model's dtype) and read
    by the cache's per-row positions. The table grows by doubling as sequences get longer. "dynamic" scaling past
    max_position_embeddings changes the frequencies with the sequence length, so those steps compute theirs.

    Not a module: nothing here is a checkpoint weight, and the model is built on the meta device.
    """

    def __init__(self, config: LlamaConfig):
        self.settings = config.rope()
        self.dim = config.head_size
        self.max_positions = config.max_position_embeddings
        self.dynamic = self.settings["rope_type"] == "dynamic"
        self._inv_freq: torch.Tensor | None = None
        self._table: torch.Tensor | None = None  # (P, 2D) [cos | signed sin]

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        if seq_len is not None:
            return inverse_frequencies(self.settings, self.dim, self.max_positions, seq_len)
        if self._inv_freq is None:
            self._inv_freq = inverse_frequencies(self.settings, self.dim, self.max_positions)
        return self._inv_freq

    def __call__(self, positions: torch.Tensor, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, t), all below `end` -> cos and signed sin, each (B, t, 1, D) in `dtype`, for apply_rope."""
        rows = None
        if self.dynamic and end > self.max_positions:
            seq_len = int(positions.max()) + 1  # transformers scales by the longest row's length
            if seq_len > self.max_positions:
                rows = _cos_sin(positions, self.inv_freq(seq_len).to(positions.device)).to(dtype)
        if rows is None:
            table = self._table
            if table is None or table.shape[0] < end or table.dtype != dtype or table.device != positions.device:
                table = self._table = self._build(end, dtype, positions.device)
            rows = F.embedding(positions, table)  # (B, t, 2D)
        return rows[:, :, None, :self.dim], rows[:, :, None, self.dim:]

    def _build(self, end: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = max(256, 1 << (end - 1).bit_length())  # doubling: a long generation rebuilds it a few times only
        if not self.dynamic:
            size = max(size, min(self.max_positions, 4096))
        positions = torch.arange(size, device="cpu")
        return _cos_sin(positions, self.inv_freq()).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, t, H, D) heads by (B, t, 1, D) cos and signed sin: x * cos + rotate_half(x) * sin.

    rotate_half(x) * sin = [-x2, x1] * [s, s] = [x2, x1] * [-s, s], so the sine's sign lives in the table."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]
    return x * cos + swapped * signed_sin


# ----------------------------------------------------------------------------------------------
# Layers


class LlamaRMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as transformers does.

    In float32 it runs as layer_norm over [x, -x] with the weight doubled: that row's mean is 0 and its variance
    mean(x^2), so the first half is x / rms(x) * weight to float32 rounding, in one fused kernel. F.rms_norm is a
    chain of ~10 small ops on the CPU, and a batch-1 decode step runs two norms per layer: SmolLM2-135M's step went
    from 30.7 to 29.2 ms (2-core AMD EPYC).
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            size = x.shape[-1]
            doubled = derived_copy(self, "_doubled_weight", weight, _doubled)
            return F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * size,), doubled, None, self.eps)[..., :size]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _doubled(weight: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
        return torch.cat((weight, weight))


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention over the cache, with RoPE on queries and keys."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.head_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.output_bias)
        self._qkv = FusedProjection()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, index: int,
                mask) -> torch.Tensor:
        """x: (B, t, C) the new positions -> (B, t, C). rope: cos and signed sin, each (B, t, 1, D)."""
        b, t, _ = x.shape
        qkv = linear(x, self._qkv.refresh((self.q_proj, self.k_proj, self.v_proj)))
        qkv = qkv.view(b, t, -1, self.head_dim)  # (B, t, Hq + 2 Hkv, D)
        rotated = apply_rope(qkv[:, :, :self.num_heads + self.num_kv_heads], *rope)  # (B, t, Hq + Hkv, D)
        q = rotated[:, :, :self.num_heads].transpose(1, 2)  # (B, Hq, t, D)
        k = rotated[:, :, self.num_heads:].transpose(1, 2)  # (B, Hkv, t, D)
        v = qkv[:, :, self.num_heads + self.num_kv_heads:].transpose(1, 2)  # (B, Hkv, t, D)
        k, v = cache.update(index, k, v)  # (B, Hkv, S, D)
        return linear(merge_heads(cached_attention(q, k, v, mask)), self.o_proj)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), gate and up as one product."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self._gate_up = FusedProjection()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self._gate_up.refresh((self.gate_proj, self.up_proj))).chunk(2, dim=-1)  # (B, t, I) each
        return linear(self.act(gate).mul_(up), self.down_proj)  # in place on act's fresh output


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, window: int | None):
        super().__init__()
        self.window = window
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, index: int,
                mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, index, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def sliding_window_mask(cache: KVCache, t: int, window: int, causal_mask) -> tuple[torch.Tensor | None, bool]:
    """The cache's attention mask for t new queries, further limited to keys fewer than `window` slots back.

    Slots, not positions, are compared (as transformers does): under left padding the two differ by the same
    amount for a query and its keys."""
    end = cache.length + t
    if end <= window:  # no query is `window` slots past any key yet
        return causal_mask
    mask, is_causal = causal_mask
    keys = torch.arange(cache.max_length if cache.static else end, device=cache.device)  # (S,)
    queries = torch.arange(cache.length, end, device=cache.device)[:, None]  # (t, 1)
    near = keys[None, :] > queries - window  # (t, S)
    if mask is None:  # the cache's fast path: plain causal (prefill) or one unpadded query (all keys seen)
        mask = near & (keys[None, :] <= queries) if is_causal else near
        return mask[None, None], False
    return mask & near[None, None], False


# ----------------------------------------------------------------------------------------------
# Models


class LlamaModel(nn.Module):
    """The decoder without a head: (B, T) tokens -> (B, T, C) hidden states after the final norm."""

    config_class = LlamaConfig
    base_model_prefix = "model"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, w) for w in config.layer_windows())
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.windows = sorted({layer.window for layer in self.layers if layer.window is not None})

    @property
    def max_positions(self) -> int | None:
        # RoPE has no hard limit; past the trained length only "dynamic" scaling is meant to work.
        return None if self.rotary.dynamic else self.config.max_position_embeddings

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        if encoder_hidden is not None:
            raise InvalidInput(f"{self.config.model_type or 'llama'} is decoder-only: it takes no encoder_hidden.")
        weight = self.embed_tokens.weight
        return KVCache(self.config.num_hidden_layers, rows, self.config.kv_heads, self.config.head_size, max_length,
                       dtype=weight.dtype, device=weight.device, static=static)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> final hidden states (B, t, C)."""
        t = tokens.shape[1]
        cache.check_room(t)
        x = self.embed_tokens(tokens)  # (B, t, C)
        rope = self.rotary(cache.positions(t), cache.length + t, x.dtype)  # cos, signed sin: (B, t, 1, D) each
        causal = cache.attention_mask(t)
        masks = {None: causal, **{w: sliding_window_mask(cache, t, w, causal) for w in self.windows}}
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, cache, index, masks[layer.window])
        cache.advance(t)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hidden states (B, T, C) of every position. Padding may be on the left (each row's positions start at its
        first real token, as in generation) or on the right; padded positions' states are meaningless."""
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"last_hidden_state": self.decode(input_ids.to(self.embed_tokens.weight.device), cache)}


class LlamaForCausalLM(nn.Module):
    """The decoder with its language-model head (`lm_head`, tied to the token embeddings when the config says so)."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def max_positions(self) -> int | None:
        return self.model.max_positions

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False) -> KVCache:
        """An empty cache for `rows` sequences of up to `max_length` tokens (see KVCache for `static`)."""
        return self.model.new_cache(rows, max_length, encoder_hidden=encoder_hidden, static=static)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> logits (B, t, V), or (B, 1, V) of the last position only."""
        hidden = self.model.decode(tokens, cache)
        return vocab_logits(hidden[:, -1:] if last_only else hidden, self.lm_head)

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache, *, positions: int | None = None) -> torch.Tensor:
        """tokens (B, t) appended to the cache -> (B,) the most likely next token of each row (or (B, positions):
        after each of the last `positions` tokens): the argmax of decode_step's logits, found without computing them
        all (layers.greedy_tokens)."""
        return greedy_positions(self.model.decode(tokens, cache), self.lm_head, positions)

    def spare_rows(self) -> int:
        return spare_rows(self)

    @property
    def guesses_are_exact(self) -> bool:
        """Whether a pass gives each position the same result however many tokens it is fed, so that guessed tokens
        checked in one pass (generation.lookup) leave greedy tokens unchanged. Not under "dynamic" RoPE scaling:
        past the trained length its frequencies follow the furthest position in the pass."""
        return not self.model.rotary.dynamic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits (B, T, V) of every position (padding as in LlamaModel.forward)."""
        cache = full_sequence_cache(self, input_ids, attention_mask)
        return {"logits": self.decode_step(input_ids.to(self.lm_head.weight.device), cache)}


class LlamaForSequenceClassification(nn.Module):
    """Labels from the hidden state of each row's last token, as transformers picks it: the last token that is not
    the pad token (config.pad_token_id), or, with no pad token, the last real token of the attention mask."""

    config_class = LlamaConfig
    base_model_prefix = "model"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.model(input_ids, attention_mask)["last_hidden_state"]  # (B, T, C)
        last = self._last_tokens(input_ids.to(hidden.device), attention_mask)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
        return {"logits": linear(pooled, self.score)}

    def _last_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        pad = self.config.pad_token_id
        if pad is not None:
            real = input_ids != pad
        elif attention_mask is not None:
            real = torch.as_tensor(attention_mask, device=input_ids.device).bool()
        else:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        return (slots * real).argmax(dim=-1)  # the rightmost real slot (0 when a row has none)


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints use these names already. Every matrix (the linear layers, the token embeddings that may also be
    the head) is laid out (in, out) in memory, the layout a batch-1 decode step reads fastest (see layers.linear;
    fused q/k/v and gate/up keep it). Older checkpoints also saved RoPE's inverse frequencies, which are computed
    here. `lm_head.weight`, which tied checkpoints omit, comes from the token embeddings (see `tied_weights`)."""
    return {key: by_input_rows(tensor) if tensor.dim() == 2 else tensor
            for key, tensor in state_dict.items() if not key.endswith("rotary_emb.inv_freq")}


ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "LlamaModel": LlamaModel,
    "MistralModel": LlamaModel,
    "Qwen2Model": LlamaModel,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": LlamaForSequenceClassification,
}
HEADS = {
    "base": LlamaModel,
    "causal-lm": LlamaForCausalLM,
    "sequence-classification": LlamaForSequenceClassification,
}
TASK_OF_HEAD = {"causal-lm": "text-generation"}
Config = LlamaConfig
NO_SPLIT_MODULES = ("LlamaDecoderLayer",)  # blocks a device_map places whole
