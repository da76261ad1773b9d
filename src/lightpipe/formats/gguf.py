"""GGUF files (llama.cpp's format) -> a config dict, a state dict and a tokenizer, as a Hub folder gives them.

A GGUF file is one self-contained checkpoint, little-endian throughout:

    "GGUF" | version (u32) | tensor count (u64) | metadata count (u64)
    metadata: key (string), value type (u32), value          e.g. llama.block_count = 30
    tensor table: name, dims (fastest first), ggml type, offset into the data section
    padding up to `general.alignment` (32), then the tensor data

Tensors are stored as ggml types: plain floats (F32, F16, BF16) or quantised blocks (Q8_0, Q4_K, ...),
dequantised by formats/ggml.py. The file is memory-mapped: nothing but the metadata is read until a tensor
is asked for.

`read(path)` parses the header; `config_dict`, `state_dict` and `tokenizer` turn it into config.json's
keys (transformers' names), weights under transformers' names and layouts (llama.cpp's Q/K row
permutation undone, GPT-2's Conv1D layout restored) and a lightpipe Tokenizer with the chat template
(formats/gguf_tokenizer.py).
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
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInput, UnsupportedModel
from .ggml import BLOCK_FORMS, DEQUANTIZERS, GGML_TYPES, block_form, dequantize, ggml_type_label

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
            raise CheckpointError(f"{self.path} holds a string that is not UTF-8 at offset "
                                  f"{self.pos - len(raw)}.") from e

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


def state_dict(gguf: GGUFFile, config: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under transformers' name and in its layout; quantised tensors dequantised to float32,
    float tensors as stored (views of the map when no reordering is needed). With `dtype`, each tensor is
    cast as soon as it is dequantised, so a half-precision load never holds the whole model in float32."""
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
            tensor = _hf_tensor(gguf, name, stem, arch, config)
            state[key] = tensor if dtype is None else tensor.to(dtype)
    if unknown:
        raise CheckpointError(
            f"{gguf.path} holds tensors lightpipe does not know for a {gguf.architecture} model: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}."
        )
    return state


def _block_sources(gguf: GGUFFile, arch: Architecture) -> dict[str, tuple[str, str]]:
    """transformers' weight name -> (GGUF name, stem) for the matrices stored in a type in ggml.BLOCK_FORMS."""
    sources = {}
    for name, info in gguf.tensors.items():
        target = hf_name(arch, name) if info.ggml_type in BLOCK_FORMS and len(info.shape) == 2 else None
        if target is not None and target[1] not in arch.conv1d:  # a transposed matrix has other blocks
            sources[target[0]] = (name, target[1])
    return sources


def _same_values(form, weight: torch.Tensor) -> bool:
    """The block form rebuilds the loaded weight, checked on its first, middle and last rows."""
    rows = weight.shape[0]
    return all(torch.equal(form.dequantized(slice(i, i + 1)), weight[i:i + 1]) for i in {0, rows // 2, rows - 1})


def _source_for(names, sources: dict[str, tuple[str, str]], prefix: str) -> tuple[str, str] | None:
    """The file's tensor for a parameter known by `names` in the model (its base-model prefix added or dropped)."""
    for key in names:
        for candidate in (key, prefix + key, key.removeprefix(prefix)):
            if candidate in sources:
                return sources[candidate]
    return None


def attach_blocks(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Give every float32 CPU linear layer of `model` whose weight the GGUF file at `path` stores in a quantised type
    of ggml.BLOCK_FORMS that weight's blocks as they are (native.BlockWeight), for the few-row products of decode
    steps (layers.linear; a head through vocab_logits). A head tied to the token embeddings gets the embeddings' blocks.
    Returns how many layers got one; 0 where the native kernel is unavailable."""
    from .. import native
    from ..models.layers import keep_blocks

    gguf = read(path)
    arch = architecture_of(gguf)
    sources = _block_sources(gguf, arch)
    if not sources or not native.available():
        return 0
    config = config_dict(gguf)
    prefix = getattr(model, "base_model_prefix", "") + "."
    names_of: dict[int, list[str]] = {}  # a parameter -> every name it has (a tied head shares the embeddings')
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    attached = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None or weight.dtype != torch.float32 \
                or not weight.is_cpu:
            continue
        found = _source_for(names_of.get(id(weight), ()), sources, prefix)
        if found is None:
            continue
        name, stem = found
        info = gguf.tensors[name]
        form = block_form(gguf.raw(name), info.ggml_type, info.shape)
        if form is None:  # a width the kernel does not take (not a multiple of 32)
            continue
        if arch.unpermute_qk and stem in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if stem == "attn_q" else config["num_key_value_heads"]
            form = form.rows(unpermute_rows(torch.arange(info.shape[0]), heads))
        if form.shape == tuple(weight.shape) and _same_values(form, weight):
            keep_blocks(module, weight, form)
            attached += 1
    return attached


def tokenizer(gguf: GGUFFile):
    """The file's own tokenizer as a lightpipe Tokenizer (see formats/gguf_tokenizer.py)."""
    from .gguf_tokenizer import build_tokenizer

    return build_tokenizer(gguf)


# ----------------------------------------------------------------------------------------------
# Entry points for loading.py and factory.py


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    return config_dict(read(path))


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return state_dict(read(path), dtype=dtype)


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
