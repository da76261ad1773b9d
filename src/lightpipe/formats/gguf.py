"""GGUF files (llama.cpp's format) -> a config dict, a state dict and a tokenizer, as a Hub folder gives them.

A GGUF file is one self-contained checkpoint, little-endian throughout:

    "GGUF" | version (u32) | tensor count (u64) | metadata count (u64)
    metadata: key (string), value type (u32), value          e.g. llama.block_count = 30
    tensor table: name, dims (fastest first), ggml type, offset into the data section
    padding up to `general.alignment` (32), then the tensor data

Tensors are stored as ggml types: plain floats (F32, F16, BF16) or quantised blocks (Q8_0, Q4_K, ...),
which this module dequantises with torch, all blocks of a tensor at once. The file is memory-mapped:
nothing but the metadata is read until a tensor is asked for.

`read(path)` parses the header; `config_dict`, `state_dict` and `tokenizer` turn it into config.json's
keys (transformers' names), weights under transformers' names and layouts (llama.cpp's Q/K row
permutation undone, GPT-2's Conv1D layout restored) and a lightpipe Tokenizer with the chat template.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInput, UnsupportedModel

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted with 32-bit integers; llama.cpp itself stopped reading it in 2023
DEFAULT_ALIGNMENT = 32
SUFFIX = ".gguf"


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether `path` is a GGUF file: a file named *.gguf (its magic number is checked when it is read, so
    a wrong one is an error, not another format), or any file that starts with the magic number."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# ggml types: id -> name, elements per block, bytes per block


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
# Reading the header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: slowest dimension first (the file lists them fastest first)
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table and the memory-mapped bytes behind them."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray = field(repr=False)  # (file size,) uint8, a copy-on-write map of the file

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A metadata value under the architecture's prefix: arch_value("block_count") -> llama.block_count."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of one tensor, (nbytes,) uint8, sharing memory with the map."""
        info = self.tensors[name]
        return torch.from_numpy(self.data[info.start:info.start + info.nbytes])

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in torch's shape: float tensors as stored (F32/F16/BF16), quantised ones as float32."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)


class _Cursor:
    """Little-endian reads over the mapped file; reading past its end is a CheckpointError (a truncated file)."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.path, self.pos, self.size = buffer, path, 0, len(buffer)

    def truncated(self, end: int) -> CheckpointError:
        return CheckpointError(f"{self.path} is truncated: its header needs bytes up to offset {end}, but the file "
                               f"has {self.size} bytes. Download it again.")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.truncated(self.pos + n)
        chunk = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack(self.take(fmt.size))[0]

    def string(self) -> str:
        raw = self.take(self.unpack(U64))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} holds a string that is not UTF-8 at offset {self.pos - len(raw)}.") from e

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, a merge list): the hot loop of reading a header."""
        buffer, pos, size, out = self.buffer, self.pos, self.size, []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise self.truncated(pos + 8)
                length = int.from_bytes(buffer[pos:pos + 8], "little")
                pos += 8
                if pos + length > size:
                    raise self.truncated(pos + length)
                append(str(buffer[pos:pos + length], "utf-8"))
                pos += length
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} holds a string that is not UTF-8 near offset {pos}.") from e
        self.pos = pos
        return out


U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
# Metadata value type -> (numpy dtype for arrays, struct for one value); 8 = string and 9 = array are apart.
SCALAR_TYPES: dict[int, tuple[str, struct.Struct]] = {
    0: ("<u1", struct.Struct("<B")), 1: ("<i1", struct.Struct("<b")), 2: ("<u2", struct.Struct("<H")),
    3: ("<i2", struct.Struct("<h")), 4: ("<u4", U32), 5: ("<i4", struct.Struct("<i")),
    6: ("<f4", struct.Struct("<f")), 7: ("<u1", struct.Struct("<?")), 10: ("<u8", U64),
    11: ("<i8", struct.Struct("<q")), 12: ("<f8", struct.Struct("<d")),
}
STRING, ARRAY = 8, 9


def _read_value(cursor: _Cursor, value_type: int, key: str) -> Any:
    if value_type in SCALAR_TYPES:
        return cursor.unpack(SCALAR_TYPES[value_type][1])
    if value_type == STRING:
        return cursor.string()
    if value_type == ARRAY:
        item_type, count = cursor.unpack(U32), cursor.unpack(U64)
        if item_type in SCALAR_TYPES:
            dtype = np.dtype(SCALAR_TYPES[item_type][0])
            # Numeric arrays (scores, token types) stay numpy, copied out of the map.
            values = np.frombuffer(cursor.take(count * dtype.itemsize), dtype=dtype)
            return values.astype(bool) if item_type == 7 else values.copy()
        if item_type == STRING:
            return cursor.strings(count)
        if item_type == ARRAY:
            return [_read_value(cursor, ARRAY, key) for _ in range(count)]
    raise CheckpointError(f"{cursor.path}: metadata {key!r} has value type {value_type}, which GGUF does not define.")


def _open_map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            # Copy-on-write: tensors can be handed to torch as writable memory without ever touching the file.
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except ValueError as e:  # mmap refuses an empty file
        raise CheckpointError(f"{path} is empty; download it again.") from e
    except OSError as e:
        raise CheckpointError(f"{path} could not be read: {e}") from e


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and tensor table; the tensor data is mapped afresh, unread.

    The parse is cached per file (path, size and modification time): config, weights and tokenizer of one
    pipeline come from one parse. The map is not shared: a model that changes its weights in place (they
    are copy-on-write views of the map) cannot change what the next load of the file reads."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path} could not be read: {e}") from e
    version, metadata, tensors = _parse(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return GGUFFile(path, version, metadata, tensors, np.frombuffer(_open_map(path), dtype=np.uint8))


def clear_cache() -> None:
    """Forget the parsed headers, so that the next read parses its file again (as a new process would)."""
    _parse.cache_clear()


@functools.lru_cache(maxsize=2)
def _parse(path_name: str, size: int, mtime_ns: int) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
    """(version, metadata, tensor table) of a GGUF file."""
    path = Path(path_name)
    mapped = _open_map(path)
    cursor = _Cursor(memoryview(mapped), path)
    magic = bytes(cursor.take(4)) if size >= 4 else bytes(mapped[:size])
    if magic != MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}. Give a .gguf file written by "
            "llama.cpp (or its gguf package), or a Hugging Face checkpoint folder."
        )
    version = cursor.unpack(U32)
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise CheckpointError(f"{path} is a big-endian GGUF file; lightpipe reads little-endian ones, as "
                                  "llama.cpp writes them by default. Convert it again without --bigendian.")
        raise CheckpointError(f"{path} is GGUF version {version}; lightpipe reads versions {VERSIONS}. "
                              "Convert it again with a current llama.cpp.")
    tensor_count, kv_count = cursor.unpack(U64), cursor.unpack(U64)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = _read_value(cursor, cursor.unpack(U32), key)
    table = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(int(cursor.unpack(U64)) for _ in range(cursor.unpack(U32)))
        table.append((name, dims[::-1], cursor.unpack(U32), cursor.unpack(U64)))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {name: _tensor_info(path, name, shape, type_id, data_start + offset, size)
               for name, shape, type_id, offset in table}
    return version, metadata, tensors


def _tensor_info(path: Path, name: str, shape: tuple[int, ...], type_id: int, start: int, file_size: int) -> TensorInfo:
    kind = GGML_TYPES.get(type_id)
    if kind is None or type_id not in DEQUANTIZERS:
        supported = ", ".join(GGML_TYPES[t].name for t in DEQUANTIZERS)
        raise UnsupportedModel(
            f"{path}: tensor {name!r} is stored as {ggml_type_label(type_id)}, which lightpipe cannot dequantise "
            f"(supported: {supported}). Convert or quantise the model again with one of those types."
        )
    elements = math.prod(shape)  # Python integers: a corrupt table cannot overflow into a small size
    row = shape[-1] if shape else 1
    if row % kind.block_elements:
        raise CheckpointError(f"{path}: tensor {name!r} has rows of {row} values, not a whole number of "
                              f"{kind.name} blocks of {kind.block_elements}.")
    nbytes = elements // kind.block_elements * kind.block_bytes
    if start + nbytes > file_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, but the file has "
            f"{file_size} bytes. Download it again."
        )
    return TensorInfo(name, shape, type_id, start, nbytes)


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
# Architectures: metadata -> config.json keys; GGUF tensor names -> transformers' names


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    names: dict[str, str]  # top-level GGUF tensor stem -> transformers' module path
    block_names: dict[str, str]  # per-block GGUF stem -> module path inside a block
    block_prefix: str  # transformers' path of block i, with {i}
    unpermute_qk: bool = False  # llama.cpp reorders Q/K rows for its rotary layout (llama)
    conv1d: tuple[str, ...] = ()  # GGUF stems whose weight transformers stores transposed (GPT-2's Conv1D)


LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# llama.cpp writes Mistral's models (7B, Nemo) as "llama": there is no "mistral" architecture in GGUF files.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_TOP, LLAMA_BLOCK, "model.layers.{i}", unpermute_qk=True),
    # llama.cpp runs Qwen2 with NeoX-style rotary embeddings: its Q/K rows are stored as transformers has them.
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", LLAMA_TOP, LLAMA_BLOCK, "model.layers.{i}"),
    "gpt2": Architecture(
        "gpt2", "GPT2LMHeadModel",
        {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
         "output": "lm_head"},
        {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
         "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
        "transformer.h.{i}",
        conv1d=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    ),
}
# Tensors llama.cpp writes that transformers' models do not hold (Llama 3's precomputed rotary frequencies).
IGNORED_TENSORS = ("rope_freqs.weight",)


def architecture_of(gguf: GGUFFile) -> Architecture:
    arch = gguf.architecture
    if not arch:
        raise CheckpointError(f"{gguf.path} names no general.architecture in its metadata; it is not a model file.")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(
            f"{gguf.path} holds a {arch!r} model; lightpipe runs GGUF files of the architectures "
            f"{', '.join(sorted(ARCHITECTURES))}. Use a Hugging Face checkpoint of this model instead."
        )
    return ARCHITECTURES[arch]


def _count(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    """An integer under the architecture's prefix (llama.block_count ...); a per-layer array must hold one value
    throughout (some converters write head counts so). Missing without a default: a CheckpointError."""
    value = gguf.arch_value(key, default)
    if value is None:
        raise CheckpointError(f"{gguf.path} lacks the metadata {gguf.architecture}.{key}, which the model needs.")
    if isinstance(value, np.ndarray):
        values = set(value.tolist())
        if len(values) != 1:
            raise UnsupportedModel(f"{gguf.path} gives {gguf.architecture}.{key} per layer with different values "
                                   f"({sorted(values)}); lightpipe's {gguf.architecture} model has one for all layers.")
        value = values.pop()
    return int(value)


def _special_ids(gguf: GGUFFile) -> dict[str, int]:
    names = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id",
             "unk_token_id": "unknown_token_id"}
    return {key: int(gguf.metadata[f"tokenizer.ggml.{name}"]) for key, name in names.items()
            if f"tokenizer.ggml.{name}" in gguf.metadata}


def _vocab_size(gguf: GGUFFile) -> int:
    size = gguf.arch_value("vocab_size")
    if size is None:
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{gguf.path} gives neither {gguf.architecture}.vocab_size nor a vocabulary.")
        size = len(tokens)
    return int(size)


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    kind = gguf.arch_value("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(gguf.arch_value("rope.scaling.factor", 1.0))}
    original = gguf.arch_value("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The model's config.json as transformers builds it from this file's metadata."""
    arch = architecture_of(gguf)
    common = {"model_type": arch.model_type, "architectures": [arch.hf_class], "vocab_size": _vocab_size(gguf),
              "tie_word_embeddings": "output.weight" not in gguf.tensors,
              # transformers dequantises every tensor, and loads even F16 files in float32 unless told otherwise
              "dtype": "float32",
              **_special_ids(gguf)}
    if arch.model_type == "gpt2":
        context = _count(gguf, "context_length")
        return {**common, "n_layer": _count(gguf, "block_count"), "n_embd": _count(gguf, "embedding_length"),
                "n_head": _count(gguf, "attention.head_count"), "n_positions": context, "n_ctx": context,
                "n_inner": _count(gguf, "feed_forward_length"),
                "layer_norm_epsilon": float(gguf.arch_value("attention.layer_norm_epsilon", 1e-5))}
    heads = _count(gguf, "attention.head_count")
    rope_theta = float(gguf.arch_value("rope.freq_base", 10000.0))
    config = {
        **common,
        "hidden_size": _count(gguf, "embedding_length"),
        "intermediate_size": _count(gguf, "feed_forward_length"),
        "num_hidden_layers": _count(gguf, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _count(gguf, "attention.head_count_kv", heads),
        "rms_norm_eps": float(gguf.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": _count(gguf, "context_length", 2048),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
    }
    head_dim = gguf.arch_value("attention.key_length") or (gguf.arch_value("rope.dimension_count")
                                                           if arch.unpermute_qk else None)
    if head_dim:
        config["head_dim"] = int(head_dim)
    scaling = _rope_scaling(gguf)
    if scaling:
        config["rope_scaling"] = scaling
        config["rope_parameters"] = {**scaling, "rope_theta": rope_theta}
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf.tensors
    return config


BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
TOP_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(arch: Architecture, name: str) -> tuple[str, str] | None:
    """GGUF tensor name -> (transformers' name, GGUF stem), or None when transformers has no such tensor."""
    if match := BLOCK_NAME.match(name):
        index, stem, kind = match.groups()
        if stem in arch.block_names:
            return f"{arch.block_prefix.format(i=index)}.{arch.block_names[stem]}.{kind}", stem
    elif (match := TOP_NAME.match(name)) and match.group(1) in arch.names:
        return f"{arch.names[match.group(1)]}.{match.group(2)}", match.group(1)
    return None


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. Its converter regroups each head's rows from transformers' halves
    layout (rotary pairs i and i + D/2) into interleaved pairs (2i, 2i + 1); this puts them back."""
    rows = tensor.shape[0]
    rest = tensor.shape[1:]
    return tensor.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


# Below this many values a tensor is dequantised on one thread: its few elementwise passes are too short to
# gain from more, and each would wait at a thread barrier (long waits on a busy machine).
PARALLEL_MIN_VALUES = 1 << 22


@contextlib.contextmanager
def _one_thread_if(small: bool):
    threads = torch.get_num_threads()
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hf_tensor(gguf: GGUFFile, name: str, stem: str, arch: Architecture, config: dict[str, Any]) -> torch.Tensor:
    """One tensor dequantised and put in transformers' layout."""
    tensor = gguf.tensor(name)
    if arch.unpermute_qk and stem in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if stem == "attn_q" else config["num_key_value_heads"]
        tensor = unpermute_rows(tensor, heads)
    if stem in arch.conv1d and tensor.dim() == 2:
        tensor = tensor.t().contiguous()  # Conv1D keeps (in, out); llama.cpp stores (out, in)
    return tensor


def state_dict(gguf: GGUFFile, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under transformers' name and in its layout; quantised tensors dequantised to float32,
    float tensors as stored (views of the map when no reordering is needed)."""
    arch = architecture_of(gguf)
    config = config or config_dict(gguf)
    unknown = []
    state: dict[str, torch.Tensor] = {}
    if "rope_freqs.weight" in gguf.tensors:
        logger.warning("%s holds llama.cpp's precomputed rotary frequency factors (rope_freqs, Llama 3.1 style "
                       "scaling); they are not used, as in transformers, so long-context outputs may differ from "
                       "llama.cpp's.", gguf.path.name)
    for name, info in gguf.tensors.items():
        target = hf_name(arch, name)
        if target is None:
            if name not in IGNORED_TENSORS:
                unknown.append(name)
            continue
        key, stem = target
        with _one_thread_if(math.prod(info.shape) < PARALLEL_MIN_VALUES):
            state[key] = _hf_tensor(gguf, name, stem, arch, config)
    if unknown:
        raise CheckpointError(
            f"{gguf.path} holds tensors lightpipe does not know for a {gguf.architecture} model: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}."
        )
    return state


# ----------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* metadata -> a `tokenizers` backend, as transformers' GGUF converter builds it

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}
# Split patterns of the byte-level vocabularies whose merges were learned on another split than GPT-2's,
# by tokenizer.ggml.pre (the pretokenizer llama.cpp names).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "tekken": TEKKEN_SPLIT,  # Mistral Nemo, written as a llama model
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT, "falcon3": LLAMA3_SPLIT, "pixtral": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "megrez": QWEN2_SPLIT,
}


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    bytes to the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_types(gguf: GGUFFile, count: int) -> np.ndarray:
    types = gguf.metadata.get("tokenizer.ggml.token_type")
    return np.asarray(types) if types is not None else np.zeros(count, dtype=np.int32)


def _byte_level_backend(gguf: GGUFFile, tokens: list[str]):
    """Byte-level BPE (GPT-2, SmolLM, Qwen2, Llama 3): the vocabulary spelled in GPT-2's byte alphabet."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside the alphabet (some converters write added tokens in plain UTF-8) is respelled.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = _merges(gguf, vocab, tokens)
    backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(str(gguf.metadata.get("tokenizer.ggml.pre", "")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def _sentencepiece_backend(gguf: GGUFFile, tokens: list[str]):
    """SentencePiece-style BPE (Llama 1/2, Mistral): "▁" for spaces, byte fallback for unknown characters."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(gguf, vocab, tokens, gguf.metadata.get("tokenizer.ggml.scores"))
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend, None


def _merges(gguf: GGUFFile, vocab: dict[str, int], tokens: list[str], scores=None) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files carry none) those its vocabulary implies: every split of a
    token into two tokens, best-scored token first."""
    merges = gguf.metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        return [tuple(m.split(" ", 1)) for m in merges]
    if scores is None:
        raise CheckpointError(f"{gguf.path} has a BPE vocabulary without merges or scores; it cannot be tokenized.")
    found = []
    for token, score in dict(zip(tokens, np.asarray(scores).tolist())).items():  # a repeated token: its last score
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


TOKENIZER_BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def tokenizer(gguf: GGUFFile):
    """The file's own tokenizer (vocabulary, merges, special tokens, BOS/EOS flags, chat template), as a
    lightpipe Tokenizer equal to the one transformers builds with `AutoTokenizer.from_pretrained(gguf_file=)`."""
    from tokenizers import AddedToken

    from ..processing.text import Tokenizer

    kind = str(gguf.metadata.get("tokenizer.ggml.model", ""))
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if kind not in TOKENIZER_BUILDERS or tokens is None:
        raise UnsupportedModel(
            f"{gguf.path} has a {kind or 'missing'!r} tokenizer; lightpipe builds GGUF tokenizers of the kinds "
            f"{', '.join(sorted(TOKENIZER_BUILDERS))}. Pass tokenizer= a Hugging Face tokenizer folder."
        )
    backend, alphabet = TOKENIZER_BUILDERS[kind](gguf, tokens)
    types = _token_types(gguf, len(tokens))
    # Control tokens (<|im_end|>) stay whole as special tokens, user-defined ones (<think>) as plain added
    # tokens. In a byte-level vocabulary a "control" token outside the byte alphabet is a converter's
    # mislabel that no model id stands behind, so it is left out, as transformers does.
    def spelled(kind: int) -> list[str]:
        return [tokens[i] for i in np.flatnonzero(types == kind) if alphabet is None or set(tokens[i]) <= alphabet]

    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in spelled(CONTROL)])
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in spelled(USER_DEFINED)])
    special = {name: tokens[int(gguf.metadata[f"tokenizer.ggml.{key}"])] for name, key in SPECIAL_IDS.items()
               if f"tokenizer.ggml.{key}" in gguf.metadata and int(gguf.metadata[f"tokenizer.ggml.{key}"]) < len(tokens)}
    # The named special tokens (an <unk> typed "unknown", not "control") are special too.
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special.values()])
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos_token" in special
    add_eos = bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    backend.post_processor = _template(backend, special, add_bos, add_eos)
    return Tokenizer(backend, special, returns_token_type_ids=False, name_or_path=str(gguf.path),
                     chat_template=gguf.metadata.get("tokenizer.chat_template"))


def _template(backend, special: dict[str, str], add_bos: bool, add_eos: bool):
    from tokenizers import processors

    bos, eos = special.get("bos_token"), special.get("eos_token")
    first = f"{bos}:0 " if add_bos else ""
    last = f" {eos}:0" if add_eos else ""
    pair_first = f" {bos}:1" if add_bos else ""
    pair_last = f" {eos}:1" if add_eos else ""
    used = ([(bos, backend.token_to_id(bos))] if add_bos else []) + ([(eos, backend.token_to_id(eos))] if add_eos else [])
    return processors.TemplateProcessing(single=f"{first}$A:0{last}",
                                         pair=f"{first}$A:0{last}{pair_first} $B:1{pair_last}",
                                         special_tokens=used)


# ----------------------------------------------------------------------------------------------
# Entry points for loading.py and factory.py


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    return config_dict(read(path))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return state_dict(read(path))


def load_tokenizer(path: str | os.PathLike):
    return tokenizer(read(path))


def generation_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The generation settings a GGUF implies (it has no generation_config.json): its special token ids,
    as transformers derives a generation config from the model config."""
    ids = _special_ids(gguf)
    return {key: ids[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in ids}


def load_component(name: str, path: str | os.PathLike):
    """A pipeline part read from the GGUF file itself: its tokenizer or its generation config."""
    if name == "tokenizer":
        return load_tokenizer(path)
    if name == "generation_config":
        from ..generation import GenerationConfig

        return GenerationConfig.from_dict(generation_dict(read(path)))
    raise InvalidInput(f"a GGUF file holds no {name.replace('_', ' ')}; pass {name}= a folder that has one.")
