"""The key/value cache of autoregressive decoding: an explicit object the model reads and writes.

Self-attention keys and values live in buffers (B, Hkv, room, D) per layer - allocated for max_length slots at
once when static, else for a few dozen and doubled when full - where Hkv is the model's key/value head count
(smaller than its query head count under grouped-query attention). A decode step writes its t new positions at
slots [length, length + t). Left padding (batched prompts of different lengths) is described by one number per row,
which gives both the attention mask and each row's own position of every slot (slot minus the row's padding), so
the rows of a left-padded batch count from 0.

Two shapes of the same computation, giving the same tokens:
- dynamic (the default): attention reads the filled slots [0, length + t), a view that grows by one per step.
  On the CPU this is cheaper: a step never reads slots that hold nothing yet.
- static (`static=True`): attention always reads all max_length slots, with a full-length mask hiding the empty
  ones. Every decode step then has the same shapes, which is what torch.compile and CUDA graphs need.

Beam search reorders rows with `reorder(index)`. Models with an encoder keep their cross-attention keys/values
beside this (see lightpipe.models.layers.EncoderDecoderCache): nothing here knows about them.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput


_FIRST_CAPACITY = 64  # slots a dynamic cache holds before it first grows


class KVCache:
    """Per-layer self-attention keys/values in preallocated buffers.

    The model calls, for each decode step of t tokens: `check_room(t)`, `attention_mask(t)` and `positions(t)`
    once, `update(layer, k, v)` in every layer, and `advance(t)` at the end.
    """

    # Whether rows may leave (reorder with a shorter index): generation then drops the rows that are done.
    can_drop_rows = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype, device: torch.device | str, static: bool = False):
        # A dynamic cache starts with room for a few dozen slots and doubles when full (see _grow): beam search
        # moves whole buffers when it reorders rows, and a buffer sized for max_length (Whisper: 448) while ~100
        # slots are used moved 4x the bytes. A static one is allocated whole, as its shapes must never change.
        capacity = max_length if static else min(max_length, _FIRST_CAPACITY)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        # Static caches are read whole: the empty slots must hold finite numbers (masked, weight 0, but 0 * NaN
        # would still be NaN), so they start at zero.
        make = torch.zeros if static else torch.empty
        self.keys = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.static = static
        self.length = 0  # slots filled so far, the same for every row
        self.padding: torch.Tensor | None = None  # (B,) left-padding slots per row; None when no row is padded
        self._spare: torch.Tensor | None = None  # a buffer of one layer's shape, for beam reordering

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    # ------------------------------------------------------------------ per step
    def check_room(self, t: int) -> None:
        if self.length + t > self.max_length:
            raise InvalidInput(
                f"the decoder cache holds {self.max_length} positions and {self.length} are used; {t} more do not "
                "fit. Ask for fewer new tokens or a shorter prompt."
            )

    def positions(self, t: int) -> torch.Tensor:
        """(B, t) positions of the next t tokens: slot index minus the row's left padding."""
        slots = torch.arange(self.length, self.length + t, device=self.device)[None, :]  # (1, t)
        if self.padding is None:
            return slots.expand(self.batch_size, t)
        return (slots - self.padding[:, None]).clamp_(min=0)

    def attention_mask(self, t: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for t new queries over the keys `update` returns, as scaled_dot_product_attention
        takes them.

        mask is boolean (B or 1, 1, t, S), True where attended (S = length + t, or max_length when static), or None
        with is_causal telling SDPA to apply the plain causal rule itself (the fast dynamic path: no padding, and
        either one new token or an empty cache).
        """
        end = self.length + t
        if self.padding is None and not self.static:
            if t == 1:
                return None, False
            if self.length == 0:
                return None, True
        keys = torch.arange(self.max_length if self.static else end, device=self.device)  # (S,)
        queries = torch.arange(self.length, end, device=self.device)[:, None]  # (t, 1)
        mask = (keys[None, :] <= queries)[None, None]  # (1, 1, t, S) causal; also hides the empty slots
        if self.padding is not None:
            real = keys[None, :] >= self.padding[:, None]  # (B, S)
            # A padding slot still sees itself, so its (unused) output stays finite instead of NaN.
            mask = (mask & real[:, None, None, :]) | (keys[None, :] == queries)[None, None]
        return mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, t, D) new keys/values at [length, length + t); return what attention reads:
        (B, Hkv, length + t, D) views, or the whole (B, Hkv, max_length, D) buffers when static."""
        end = self.length + k.shape[2]
        if k.device != self.keys[layer].device:  # a layer placed on another device (a device_map): its buffers follow
            self.keys[layer], self.values[layer] = self.keys[layer].to(k.device), self.values[layer].to(k.device)
        if end > self.keys[layer].shape[2]:
            self._grow(layer, end)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        if self.static:
            return self.keys[layer], self.values[layer]
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def crop(self, length: int) -> None:
        """Forget the slots from `length` on (guessed tokens that were rejected): the next step writes over them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} slots to {length}")
        self.length = length

    def _grow(self, layer: int, end: int) -> None:
        """Room for at least `end` slots in the layer's buffers (twice the old room, at most max_length), the filled
        slots copied over."""
        for buffers in (self.keys, self.values):
            old = buffers[layer]
            capacity = min(self.max_length, max(end, 2 * old.shape[2]))
            grown = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            grown[:, :, :self.length] = old[:, :, :self.length]
            buffers[layer] = grown

    # ------------------------------------------------------------------ set-up and beams
    def set_left_padding(self, padding: torch.Tensor | None) -> None:
        """padding: (B,) number of padding slots at the start of each row, or None."""
        if padding is not None and bool((padding == 0).all()):
            padding = None
        self.padding = None if padding is None else padding.to(self.device, torch.long)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows <- rows[index] (beam search, or dropping finished rows when index is shorter)."""
        if index.numel() == self.batch_size and torch.equal(index, torch.arange(self.batch_size, device=index.device)):
            return  # every beam kept its own history: nothing moves
        if index.numel() != self.batch_size:
            self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
            self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
            self._spare = None
        elif self.length:
            # Gathering whole contiguous buffers into a spare one and swapping is several times faster than
            # gathering the strided filled part in place, although it moves the empty slots too.
            if self._spare is None:
                self._spare = torch.empty_like(self.keys[0])
            for buffers in (self.keys, self.values):
                for layer in range(len(buffers)):
                    if buffers[layer].device != self._spare.device or buffers[layer].shape != self._spare.shape:
                        self._spare = torch.empty_like(buffers[layer])  # layers on several devices, a grown cache
                    torch.index_select(buffers[layer], 0, index.to(buffers[layer].device), out=self._spare)
                    buffers[layer], self._spare = self._spare, buffers[layer]
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index.to(self.padding.device))

    def to(self, device: torch.device | str) -> "KVCache":
        """Every tensor this cache holds (buffers, padding, and what subclasses and models keep on it: cross-attention
        keys/values, masks) moved to `device`, in place; returns self."""
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return type(value)(move(v) for v in value)
            return value

        for name, value in vars(self).items():
            setattr(self, name, move(value))
        return self
