"""ggml's tensor types and their dequantisation: the stored blocks of a GGUF tensor -> float values.

A quantised type stores a tensor's rows in blocks of 32 or 256 values ("super-blocks" for the K and IQ4_XS
types), each block a few float16 scales and packed small integers; every value is scale * integer (+ min).
`dequantize` turns all blocks of a tensor into floats at once with torch (no loop over blocks), keeping the
order of operations of ggml's reference code in float32, so its results are bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# ----------------------------------------------------------------------------------------------
# Types: id -> name, elements per block, bytes per block


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_elements: int
    block_bytes: int


GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4), 1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18), 3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22), 7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34), 9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", 256, 84), 11: GGMLType("Q3_K", 256, 110), 12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176), 14: GGMLType("Q6_K", 256, 210), 15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66), 17: GGMLType("IQ2_XS", 256, 74), 18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50), 20: GGMLType("IQ4_NL", 32, 18), 21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82), 23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1), 25: GGMLType("I16", 1, 2), 26: GGMLType("I32", 1, 4), 27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8), 29: GGMLType("IQ1_M", 256, 56), 30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54), 35: GGMLType("TQ2_0", 256, 66), 39: GGMLType("MXFP4", 32, 17),
}


def ggml_type_label(type_id: int) -> str:
    known = GGML_TYPES.get(type_id)
    return f"{known.name} (ggml type {type_id})" if known else f"ggml type {type_id}"


# ----------------------------------------------------------------------------------------------
# Dequantisation: (n_blocks * block_bytes,) uint8 -> float values, every block of a tensor at once.
# Each formula keeps the order of operations of ggml's reference code in float32, so results are bit-exact.


def _blocks(raw: torch.Tensor, kind: GGMLType) -> torch.Tensor:
    return raw.view(-1, kind.block_bytes)  # (n_blocks, block_bytes)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as float32: (n_blocks, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the low nibbles of all bytes, then their high nibbles (ggml's order)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 8, k): bit j of every byte along a new axis (ggml's high-bit planes)."""
    shifts = torch.arange(8, dtype=torch.uint8).view(8, 1)
    return (packed.unsqueeze(-2) >> shifts) & 1


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 4, k): the 2-bit fields at shifts 0, 2, 4, 6 along a new axis."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    return (packed.unsqueeze(-2) >> shifts) & 3


def _scaled(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """d * q (+ m), in place on the float copy of q; d and m broadcast over each block's values."""
    out = q.to(torch.float32)
    out.mul_(d)
    return out.add_(m) if m is not None else out


def _q8_0(blocks):
    return _scaled(blocks[:, 2:].view(torch.int8), _half(blocks, 0))  # (n, 32)


def _q4_0(blocks):
    return _scaled(_nibbles(blocks[:, 2:]).view(torch.int8) - 8, _half(blocks, 0))


def _q4_1(blocks):
    return _scaled(_nibbles(blocks[:, 4:]), _half(blocks, 0), _half(blocks, 2))


def _five_bit(low_packed: torch.Tensor, high_packed: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values 0..31: 4 low bits from nibbles, bit 4 from a little-endian 32-bit mask."""
    high = _bits(high_packed).transpose(-1, -2).reshape(high_packed.shape[0], 32)  # bit j of the mask -> value j
    return _nibbles(low_packed) | (high << 4)


def _q5_0(blocks):
    return _scaled(_five_bit(blocks[:, 6:], blocks[:, 2:6]).view(torch.int8) - 16, _half(blocks, 0))


def _q5_1(blocks):
    return _scaled(_five_bit(blocks[:, 8:], blocks[:, 4:8]), _half(blocks, 0), _half(blocks, 2))


def _q2_k(blocks):
    n = blocks.shape[0]
    scales, d, dmin = blocks[:, :16], _half(blocks, 80), _half(blocks, 82)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _crumbs(blocks[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16).float()  # (n, 16 groups, 16)
    return (dl * q - ml).view(n, 256)


def _q3_k(blocks):
    n = blocks.shape[0]
    d = _half(blocks, 108)
    low = _nibbles(blocks[:, 96:104])  # 4 low bits of the 16 six-bit scales
    high = _crumbs(blocks[:, 104:108]).reshape(n, 16)  # their 2 high bits
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    q_low = _crumbs(blocks[:, 32:96].reshape(n, 2, 32)).reshape(n, 16, 16)
    q_high = _bits(blocks[:, :32]).reshape(n, 16, 16) ^ 1  # a set mask bit means no -4 offset
    q = (q_low.view(torch.int8) - (q_high << 2).view(torch.int8)).float()
    return (dl * q).view(n, 256)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block, (n, 8) each."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 0x3F, (third & 0x0F) | ((first >> 2) & 0x30)], dim=-1)
    mins = torch.cat([second & 0x3F, (third >> 4) | ((second >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_scaled(q: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) values of Q4_K/Q5_K -> d * scale * q - dmin * min, (n, 256)."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
    dm = (_half(blocks, 2) * mins.float()).view(n, 8, 1)
    return (d * q.float() - dm).view(n, 256)


def _q4_k(blocks):
    n = blocks.shape[0]
    q = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).view(n, 8, 32)  # 32 bytes give two groups of 32
    return _k_scaled(q, blocks)


def _q5_k(blocks):
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 48:176].reshape(n, 4, 32)).view(n, 8, 32)
    high = _bits(blocks[:, 16:48]).view(n, 8, 32)
    return _k_scaled(low | (high << 4), blocks)


def _q6_k(blocks):
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = (_half(blocks, 208) * scales).view(n, 16, 1)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64)).view(n, 8, 32)
    high = _crumbs(blocks[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).view(n, 16, 16).float()
    return (d * q).view(n, 256)


# IQ4_NL / IQ4_XS: 4-bit indices into one fixed non-uniform grid of int8 levels, denser near zero.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_levels(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32)[q.long()]


def _iq4_nl(blocks):
    return _iq4_levels(_nibbles(blocks[:, 2:])).mul_(_half(blocks, 0))  # (n, 32)


def _iq4_xs(blocks):
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 4:8])  # 4 low bits of the 8 six-bit scales: (n, 8) in (byte, nibble) order ...
    low = torch.stack([low[:, :4], low[:, 4:]], dim=-1).reshape(n, 8)  # ... sub-block 2i low, 2i + 1 high
    high_bits = blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # (n, 1) 16-bit mask
    high = (high_bits >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3  # (n, 8)
    scales = (low.to(torch.int32) | (high << 4)) - 32
    dl = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
    q = _nibbles(blocks[:, 8:136].reshape(n, 8, 16))  # (n, 8 sub-blocks, 32)
    return (dl * _iq4_levels(q)).view(n, 256)


def _floats(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda raw: raw.view(dtype)


# ggml type id -> bytes (n_blocks, block_bytes) -> values (n_blocks, block_elements); float types take raw bytes.
DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: _floats(torch.float32), 1: _floats(torch.float16), 30: _floats(torch.bfloat16),
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k, 20: _iq4_nl, 23: _iq4_xs,
}
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes of one tensor -> its values in `shape`: float types as stored, quantised ones as float32."""
    if type_id in FLOAT_TYPES:
        return DEQUANTIZERS[type_id](raw).view(shape)
    kind = GGML_TYPES[type_id]
    return DEQUANTIZERS[type_id](_blocks(raw, kind)).view(shape)


# ----------------------------------------------------------------------------------------------
# Blocks kept as they are: every type below is scale * code (+ zero) over groups of 32 (or 16) integer codes, which
# lightpipe.native multiplies without dequantising (decode steps read 0.6 or 1.1 bytes per weight instead of 4).
# scale and zero are the float32 numbers the dequantisers above use, and the kernel rebuilds each value with one
# rounding as they do (scale * code is exact wherever a zero is added: a float16 times at most 6 + 5 bits), so every
# value is the dequantised one to the bit. Each form: blocks -> (codes, scale, zero or None, bits, group) per block.


def _q4_0_form(blocks):
    d = _half(blocks, 0)
    return blocks[:, 2:18], d, d * -8.0, 4, 32  # d * q - 8 d == d * (q - 8) exactly: both sides are exact


def _q4_1_form(blocks):
    return blocks[:, 4:20], _half(blocks, 0), _half(blocks, 2), 4, 32


def _k_factors(blocks):
    """Q4_K/Q5_K: the (n, 8) scales and negated mins per group of 32, as _k_scaled computes them."""
    scales, mins = _k_scales(blocks[:, 4:16])
    return _half(blocks, 0) * scales.float(), -(_half(blocks, 2) * mins.float())


def _q4_k_form(blocks):
    n = blocks.shape[0]
    scale, zero = _k_factors(blocks)
    chunks = blocks[:, 16:144].reshape(n, 4, 2, 16)  # 4 chunks of 32 bytes: low nibbles group 2c, high group 2c + 1
    first, second = chunks[:, :, 0], chunks[:, :, 1]  # bytes j and 16 + j of a chunk
    even = (first & 0x0F) | (second << 4)  # group 2c: value j low, value 16 + j high
    odd = (first >> 4) | (second & 0xF0)  # group 2c + 1
    return torch.stack([even, odd], dim=2).reshape(n, 8 * 16), scale, zero, 4, 32


def _q8_0_form(blocks):
    return blocks[:, 2:].view(torch.int8), _half(blocks, 0), None, 8, 32


def _q5_0_form(blocks):
    return (_five_bit(blocks[:, 6:], blocks[:, 2:6]).view(torch.int8) - 16), _half(blocks, 0), None, 8, 32


def _q5_1_form(blocks):
    return _five_bit(blocks[:, 8:], blocks[:, 4:8]).view(torch.int8), _half(blocks, 0), _half(blocks, 2), 8, 32


def _q5_k_form(blocks):
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 48:176].reshape(n, 4, 32)).view(n, 8, 32)
    high = _bits(blocks[:, 16:48]).view(n, 8, 32)
    scale, zero = _k_factors(blocks)
    return (low | (high << 4)).view(torch.int8).reshape(n, 256), scale, zero, 8, 32


def _q6_k_form(blocks):
    n = blocks.shape[0]
    scale = _half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()  # (n, 16): one per group of 16
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64)).view(n, 8, 32)
    high = _crumbs(blocks[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    return ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 256), scale, None, 8, 16


BLOCK_FORMS = {2: _q4_0_form, 3: _q4_1_form, 12: _q4_k_form, 8: _q8_0_form, 6: _q5_0_form, 7: _q5_1_form,
               13: _q5_k_form, 14: _q6_k_form}


def block_form(raw: torch.Tensor, type_id: int, shape: tuple[int, ...]):
    """A 2-D tensor of a type in BLOCK_FORMS as a native.BlockWeight, or None for other types and shapes."""
    if type_id not in BLOCK_FORMS or len(shape) != 2 or shape[1] % 32:
        return None
    from ..native import BlockWeight

    out, width = shape
    codes, scale, zero, bits, group = BLOCK_FORMS[type_id](_blocks(raw, GGML_TYPES[type_id]))
    groups = width // group
    return BlockWeight(codes.reshape(out, -1), scale.reshape(out, groups),
                       None if zero is None else zero.reshape(out, groups), bits, group)
