"""The key/value cache of autoregressive decoding: an explicit object the model reads and writes.

Self-attention keys and values live in buffers preallocated for the whole generation,
(B, H, max_length, D) per layer; a decode step writes its t new positions at [length, length + t)
and attends over [0, length + t), so no step reallocates the cache. Cross-attention keys and values
are computed once from the encoder output and reused by every step. Left padding (batched prompts of
different lengths) is described by one number per row, which gives both the attention mask and the
position of every slot. Beam search reorders rows with `reorder(index)`.

Rows and cross-attention: with beams, B = batch * num_beams rows share batch cross-attention entries.
The keys/values are kept once per input; `cross_attention` folds the beams of one input into the query
axis instead of copying them (attention to the encoder has no mask, so this is exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidInput


class KVCache:
    """Per-layer self-attention keys/values, preallocated, and cross-attention keys/values computed once.

    The model calls, for each decode step of t tokens: `attention_mask(t)` and `positions(t)` once,
    `update(layer, k, v)` in every layer, and `advance(t)` at the end.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # (k, v) per layer, each (batch, H, S, D) with batch dividing batch_size; None for decoder-only models.
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.max_length = max_length
        self.length = 0  # slots filled so far, the same for every row
        self.padding: torch.Tensor | None = None  # (B,) left-padding slots per row; None when no row is padded

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    # ------------------------------------------------------------------ per step
    def check_room(self, t: int) -> None:
        if self.length + t > self.max_length:
            raise InvalidInput(
                f"the decoder cache holds {self.max_length} positions and {self.length} are used; {t} more do not "
                "fit. Ask for fewer new tokens or a shorter prompt."
            )

    def positions(self, t: int) -> torch.Tensor:
        """(B, t) positions of the next t tokens: slot index minus the row's left padding."""
        device = self.keys[0].device
        slots = torch.arange(self.length, self.length + t, device=device)[None, :]  # (1, t)
        if self.padding is None:
            return slots.expand(self.batch_size, t)
        return (slots - self.padding[:, None]).clamp_(min=0)

    def attention_mask(self, t: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for t new queries over length + t keys, as scaled_dot_product_attention takes them.

        mask is boolean (B or 1, 1, t, length + t), True where attended, or None with is_causal telling SDPA to
        apply the plain causal rule itself (the fast path: no padding, and either one new token or an empty cache).
        """
        end = self.length + t
        if self.padding is None:
            if t == 1:
                return None, False
            if self.length == 0:
                return None, True
        device = self.keys[0].device
        keys = torch.arange(end, device=device)  # (S,)
        queries = torch.arange(self.length, end, device=device)[:, None]  # (t, 1)
        mask = (keys[None, :] <= queries)[None, None]  # (1, 1, t, S) causal
        if self.padding is not None:
            real = keys[None, :] >= self.padding[:, None]  # (B, S)
            # A padding slot still sees itself, so its (unused) output stays finite instead of NaN.
            mask = (mask & real[:, None, None, :]) | (keys[None, :] == queries)[None, None]
        return mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, t, D) new keys/values at [length, length + t); return the (B, H, length + t, D) views."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    # ------------------------------------------------------------------ set-up and beams
    def set_left_padding(self, padding: torch.Tensor | None) -> None:
        """padding: (B,) number of padding slots at the start of each row, or None."""
        if padding is not None and bool((padding == 0).all()):
            padding = None
        self.padding = None if padding is None else padding.to(self.keys[0].device, torch.long)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows <- rows[index] (beam search). Each row must stay within its group of beams, whose
        cross-attention entries are shared and therefore never move."""
        if torch.equal(index, torch.arange(self.batch_size, device=index.device)):
            return  # every beam kept its own history: nothing moves
        if self.length:
            for layer in range(len(self.keys)):
                for buffers in (self.keys, self.values):
                    filled = buffers[layer][:, :, :self.length]
                    filled.copy_(filled.index_select(0, index))
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: tuple[torch.Tensor | None, bool],
                   scale: float | None = None) -> torch.Tensor:
    """(B, H, t, D) queries over (B, H, S, D) cached keys/values with the cache's mask -> (B, H, t, D)."""
    attn_mask, is_causal = mask
    if attn_mask is None and not is_causal and q.shape[2] == 1:
        return _one_query_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Unmasked attention of one query per (row, head): (B, H, 1, D) over (B, H, S, D) -> (B, H, 1, D).

    A greedy decode step has one query per row. SDPA's CPU kernel tiles for blocks of queries and takes about
    twice as long here as two matrix-vector products, which only stream the keys and values once (the cost
    that bounds this step). Same math, to float rounding.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, 1, S)
    if scale != 1.0:
        scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.matmul(scores.softmax(dim=-1), v)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    heads: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B*G, H, t, D) queries over (B, H, S, D) encoder keys/values, G rows (beams) per input -> (B*G, H, t, D).

    The G rows of one input are folded into its query axis, so the keys/values are never repeated. With
    `heads`, also returns those heads' attention probabilities, (B*G, len(heads), t, S), computed apart
    (SDPA does not expose them) for word-level timestamps.
    """
    rows, num_heads, t, dim = q.shape
    batch = k.shape[0]
    groups = rows // batch
    folded = q if groups == 1 else q.view(batch, groups, num_heads, t, dim).transpose(1, 2).reshape(
        batch, num_heads, groups * t, dim)  # (B, H, G*t, D)
    if folded.shape[2] == 1:
        out = _one_query_attention(folded, k, v, scale)
    else:
        out = F.scaled_dot_product_attention(folded, k, v, scale=scale)
    if groups > 1:
        out = out.view(batch, num_heads, groups, t, dim).transpose(1, 2).reshape(rows, num_heads, t, dim)
    weights = None
    if heads:
        index = torch.tensor(heads, device=q.device)
        scores = folded.index_select(1, index) @ k.index_select(1, index).transpose(-1, -2)  # (B, h, G*t, S)
        if scale is not None:
            scores = scores * scale
        else:
            scores = scores * dim ** -0.5
        weights = scores.softmax(dim=-1)
        if groups > 1:
            weights = weights.view(batch, len(heads), groups, t, -1).transpose(1, 2).reshape(rows, len(heads), t, -1)
    return out, weights
