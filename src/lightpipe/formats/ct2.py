"""CTranslate2 Whisper folders (the format faster-whisper runs) -> a Hugging Face Whisper checkpoint in memory.

A CTranslate2 model folder holds `model.bin` (every weight, in CTranslate2's own binary layout),
`config.json` (Whisper's decoding settings, no `model_type`), `vocabulary.json` or
`vocabulary.txt` (one token per id) and usually `tokenizer.json`. This module reads `model.bin`
itself (no ctranslate2 import), renames and splits its variables into the state dict of
transformers' `WhisperForConditionalGeneration`, and rebuilds the config.json,
generation_config.json, preprocessor_config.json and tokenizer_config.json a Hugging Face copy
of the same model would carry. The Whisper model class then loads it like any checkpoint.

The `model.bin` layout, as CTranslate2 writes it (in the writer's native byte order, which is
little-endian on every platform CTranslate2 runs on, and read as such; a "string" is a uint16
length counting a final NUL, the UTF-8 bytes, then the NUL):

    uint32 binary_version                      1 .. 6 (6 is what current CTranslate2 writes)
    string spec_name, uint32 spec_revision     version >= 2, e.g. "WhisperSpec", 3
    uint32 num_variables, then for each:
        string name                            e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8 rank, uint32 dims[rank]
        version >= 4: uint8 dtype_id, uint32 num_bytes    (float32 int8 int16 int32 float16 bfloat16)
        version <  4: uint8 item_size, uint32 num_elements
        bytes data[num_bytes]                  row-major, no padding
    uint32 num_aliases, then (string alias, string target) pairs      version >= 3

Quantised weights are stored as int8 (one float32 scale per output row) or int16 (one global
scale) beside a `<name>_scale` variable holding `quantised / float`; they are dequantised here.

One pipeline() call asks for the config, the weights and the generation config in turn; within
`parse_once()` (which loading.one_load enters) model.bin's header is parsed once for all three.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import read_json_object
from ..errors import CheckpointError, UnsupportedModel
from ..processing.audio import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from ..whisper.tokens import END_OF_TEXT, WhisperTokens

MODEL_BIN = "model.bin"
CONFIG_JSON = "config.json"
VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")
CURRENT_BINARY_VERSION = 6  # the newest layout CTranslate2 writes; newer files may change it
WHISPER_SPEC = "WhisperSpec"

# dtype id (CTranslate2's DataType enum order) -> numpy dtype of the stored bytes. bfloat16 has no
# numpy type: its bytes are read as uint16 and reinterpreted by torch.
STORED_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
                 4: np.dtype("<f2"), 5: np.dtype("<u2")}
BFLOAT16_ID = 5
# Files older than binary version 4 give only an item size, which CTranslate2 read as these types.
LEGACY_ITEM_SIZES = {4: 0, 2: 2, 1: 1}

# CTranslate2's Activation enum -> transformers' activation_function name.
ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh", 6: "sigmoid"}

MAX_INITIAL_TIMESTAMP_INDEX = 50  # the first timestamp may be at most 1.0 s (50 x 20 ms), as in Whisper
ENGLISH_ONLY_MAX_VOCAB = 51864  # CTranslate2 and faster-whisper call a vocabulary of 51865+ multilingual

# A language token of a Whisper vocabulary (the other special tokens: lightpipe.whisper.tokens).
LANGUAGE_TOKEN = re.compile(r"^<\|[a-z]{2,3}(_[a-z]+)?\|>$")  # <|en|>, <|haw|>, <|yue|>


# ----------------------------------------------------------------------------------------------
# Detecting a CTranslate2 folder


def is_ct2_folder(folder: str | Path, *, need_weights: bool = True) -> bool:
    """Whether `folder` looks like a CTranslate2 model: config.json without model_type, a
    vocabulary file and (unless need_weights=False) model.bin. Never raises."""
    folder = Path(folder)
    if need_weights and not (folder / MODEL_BIN).is_file():
        return False
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        return False
    try:
        raw = read_json_object(folder / CONFIG_JSON)
    except CheckpointError:
        return False
    return raw is not None and "model_type" not in raw


# ----------------------------------------------------------------------------------------------
# Reading model.bin


@dataclasses.dataclass
class Ct2Checkpoint:
    """The contents of one model.bin, as stored: quantised weights keep their integer dtype and
    their `<name>_scale` beside them; aliases name the stored variable they share."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.variables[self.aliases.get(name, name)].shape)

    def scalar(self, name: str, default: Any = None) -> Any:
        """A scalar attribute (num_heads, pre_norm ...) as a Python number, or `default`."""
        tensor = self.variables.get(self.aliases.get(name, name))
        if tensor is None or tensor.numel() != 1:
            return default
        return tensor.reshape(()).item()


class _Cursor:
    """Reads little-endian fields one after another from a memory map; running off the end is a
    truncated file."""

    def __init__(self, buffer: mmap.mmap, path: Path):
        self.buffer = buffer
        self.path = path
        self.pos = 0

    def _need(self, size: int, what: str) -> None:
        if self.pos + size > len(self.buffer):
            raise CheckpointError(
                f"{self.path} is truncated: {what} at byte {self.pos} needs {size} bytes, but the file ends at "
                f"{len(self.buffer)}. Download or convert the model again."
            )

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<H", what)
        self._need(length, what)
        raw = self.buffer[self.pos:self.pos + length]
        self.pos += length
        if length == 0 or raw[-1] != 0:
            raise CheckpointError(f"{self.path} is corrupt: {what} at byte {self.pos - length} is not a valid string.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} is corrupt: {what} is not UTF-8 ({e}).") from e

    def skip(self, size: int, what: str) -> int:
        """Step over `size` bytes; returns where they start."""
        self._need(size, what)
        start = self.pos
        self.pos += size
        return start


# The headers parsed in the current parse_once() block: (path, size, mtime) -> checkpoint; None outside one.
_PARSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ct2_parsed_headers", default=None)


@contextlib.contextmanager
def parse_once():
    """Within this block each model.bin is parsed once, however many times it is read (config, weights,
    generation config of one load); the parsed headers, and their memory maps, are let go at its end."""
    token = _PARSED.set({})
    try:
        yield
    finally:
        _PARSED.reset(token)


def read_model_bin(path: str | Path) -> Ct2Checkpoint:
    """model.bin -> its variables as torch tensors over a copy-on-write memory map (nothing is read
    until used). Raises CheckpointError for unsupported versions and corrupt or truncated files.
    Inside `parse_once()` a file already parsed there (and not changed since) is not parsed again."""
    path = Path(path)
    parsed = _PARSED.get()
    if parsed is None:
        return _parse_model_bin(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return _parse_model_bin(path)  # reports the unreadable file
    if key not in parsed:
        parsed[key] = _parse_model_bin(path)
    return parsed[key]


def _parse_model_bin(path: Path) -> Ct2Checkpoint:
    try:
        with open(path, "rb") as f:
            # Copy-on-write: tensors are writable (torch wants that) without touching the file.
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise CheckpointError(f"{path} could not be read as a CTranslate2 model ({e}).") from e
    cursor = _Cursor(buffer, path)
    version = cursor.unpack("<I", "the binary version")
    if not 1 <= version <= CURRENT_BINARY_VERSION:
        raise CheckpointError(
            f"{path} has CTranslate2 binary version {version}; lightpipe reads versions 1 to "
            f"{CURRENT_BINARY_VERSION}. Convert the model again with a CTranslate2 release that writes version "
            f"{CURRENT_BINARY_VERSION}, or use its Hugging Face (safetensors) form."
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cursor.string("the spec name")
        revision = cursor.unpack("<I", "the spec revision")
    count = cursor.unpack("<I", "the number of variables")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name, tensor = _read_variable(cursor, version)
        if name in variables:
            raise CheckpointError(f"{path} is corrupt: the variable {name!r} appears twice.")
        variables[name] = tensor
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cursor.unpack("<I", "the number of aliases")):
            alias = cursor.string("an alias name")
            aliases[alias] = cursor.string(f"the target of alias {alias!r}")
    if cursor.pos != len(buffer):
        raise CheckpointError(
            f"{path} is corrupt: {len(buffer) - cursor.pos} unexpected bytes follow the last record "
            f"at byte {cursor.pos}."
        )
    missing = sorted(f"{a} -> {t}" for a, t in aliases.items() if t not in variables)
    if missing:
        raise CheckpointError(f"{path} is corrupt: aliases name variables it does not hold: {', '.join(missing[:5])}.")
    return Ct2Checkpoint(path, version, spec, revision, variables, aliases)


def _read_variable(cursor: _Cursor, version: int) -> tuple[str, torch.Tensor]:
    name = cursor.string("a variable name")
    rank = cursor.unpack("<B", f"the rank of {name}")
    shape = tuple(cursor.unpack("<I", f"the shape of {name}") for _ in range(rank))
    if version >= 4:
        type_id = cursor.unpack("<B", f"the dtype of {name}")
        num_bytes = cursor.unpack("<I", f"the size of {name}")
    else:
        item_size = cursor.unpack("<B", f"the item size of {name}")
        type_id = LEGACY_ITEM_SIZES.get(item_size, -1)
        num_bytes = cursor.unpack("<I", f"the size of {name}") * item_size
    dtype = STORED_DTYPES.get(type_id)
    if dtype is None:
        raise CheckpointError(f"{cursor.path} is corrupt or too new: {name} has the unknown dtype id {type_id}.")
    count = math.prod(shape)
    if count * dtype.itemsize != num_bytes:
        raise CheckpointError(
            f"{cursor.path} is corrupt: {name} has shape {list(shape)} of {dtype.name} "
            f"({count * dtype.itemsize} bytes) but stores {num_bytes} bytes."
        )
    start = cursor.skip(num_bytes, f"the data of {name}")
    array = np.frombuffer(cursor.buffer, dtype=dtype, count=count, offset=start).reshape(shape)
    if start % dtype.itemsize:
        array = array.copy()  # the format does not align data; misaligned tensors are undefined in C
    tensor = torch.from_numpy(array)
    if type_id == BFLOAT16_ID:
        tensor = tensor.view(torch.bfloat16)
    return name, tensor


def float_variables(checkpoint: Ct2Checkpoint) -> dict[str, torch.Tensor]:
    """Every variable as a float (or scalar) tensor, under its own name and every alias: quantised
    weights are divided by their scale and the `_scale` variables dropped."""
    stored = checkpoint.variables
    zero_points = sorted(n for n in stored if n.endswith("/weight_zero"))
    if zero_points:
        raise UnsupportedModel(
            f"{checkpoint.path} holds AWQ-quantised weights ({zero_points[0]} ...), which lightpipe does not "
            "read; convert the model with quantization float32, float16, int8 or int16 instead."
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith("_scale") and name[:-len("_scale")] in stored:
            continue
        scale = stored.get(name + "_scale")
        out[name] = tensor if scale is None else _dequantize(tensor, scale, name, checkpoint.path)
    for alias, target in checkpoint.aliases.items():
        out[alias] = out[target]
    return out


def _dequantize(values: torch.Tensor, scale: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """int8 (one scale per output row) or int16 (one global scale) -> float32: values / scale."""
    if values.is_floating_point():  # a float weight kept next to a scale has nothing to undo
        return values
    scale = scale.float()
    if scale.numel() == 1:
        return values.float() / scale.reshape(())
    if values.dim() == 0 or scale.numel() != values.shape[0]:
        raise CheckpointError(
            f"{path} is corrupt: {name} has shape {list(values.shape)} but {scale.numel()} quantisation scales."
        )
    return values.float() / scale.reshape(-1, *([1] * (values.dim() - 1)))  # (rows, 1, ...) broadcasts per row


# ----------------------------------------------------------------------------------------------
# CTranslate2 Whisper variables -> Hugging Face Whisper state dict


class _Names:
    """Pops variables by name so that any weight left over at the end is reported, not ignored."""

    def __init__(self, variables: dict[str, torch.Tensor], source: Path):
        self.variables = dict(variables)
        self.source = source

    def take(self, name: str) -> torch.Tensor:
        try:
            return self.variables.pop(name)
        except KeyError:
            raise CheckpointError(
                f"{self.source} lacks the Whisper variable {name}; it is not a complete CTranslate2 Whisper model."
            ) from None

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self.variables.pop(name, None)

    def leftover_weights(self) -> list[str]:
        return sorted(n for n, t in self.variables.items() if t.dim() > 0)


def _layer_count(names, prefix: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{prefix}/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the {prefix} layers are not numbered 0..N-1: {sorted(found)}.")
    return len(found)


def _layer_norm(names: _Names, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = names.take(f"{src}/gamma")
    out[f"{dst}.bias"] = names.take(f"{src}/beta")


def _linear(names: _Names, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = names.take(f"{src}/weight")
    bias = names.take_optional(f"{src}/bias")
    out[f"{dst}.bias"] = bias if bias is not None else out[f"{dst}.weight"].new_zeros(out[f"{dst}.weight"].shape[0])


def _fused_linear(names: _Names, src: str, dsts: list[str], out: dict) -> None:
    """A fused projection (rows of q, k, v stacked) -> separate Linear layers. Whisper's k_proj has
    no bias: CTranslate2 stores zeros there, and even a non-zero key bias adds the same q.b to
    every score of a query, which softmax cancels, so dropping it is exact."""
    weight = names.take(f"{src}/weight")  # (len(dsts) * d, d)
    bias = names.take_optional(f"{src}/bias")  # (len(dsts) * d,)
    if weight.shape[0] % len(dsts):
        raise CheckpointError(f"{src}/weight has {weight.shape[0]} rows, not a multiple of {len(dsts)} projections.")
    for dst, part in zip(dsts, weight.chunk(len(dsts), dim=0)):
        out[f"{dst}.weight"] = part
    parts = bias.chunk(len(dsts), dim=0) if bias is not None else [None] * len(dsts)
    for dst, part in zip(dsts, parts):
        if dst.endswith("k_proj"):
            continue
        out[f"{dst}.bias"] = part if part is not None else out[f"{dst}.weight"].new_zeros(out[f"{dst}.weight"].shape[0])


def _ffn(names: _Names, src: str, dst: str, out: dict) -> None:
    _linear(names, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(names, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
    _layer_norm(names, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)


def _self_attention(names: _Names, src: str, dst: str, out: dict) -> None:
    _fused_linear(names, f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"], out)
    _linear(names, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", out)
    _layer_norm(names, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)


def _cross_attention(names: _Names, src: str, dst: str, out: dict) -> None:
    # Queries come from the decoder, keys and values from the encoder output: q alone, then k and v fused.
    _linear(names, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", out)
    _fused_linear(names, f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"], out)
    _linear(names, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", out)
    _layer_norm(names, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)


def whisper_state_dict(checkpoint: Ct2Checkpoint) -> dict[str, torch.Tensor]:
    """A CTranslate2 WhisperSpec -> the state dict of transformers' WhisperForConditionalGeneration
    (model.encoder.*, model.decoder.*; proj_out.weight only when it is not tied to the embeddings)."""
    _check_whisper(checkpoint)
    variables = float_variables(checkpoint)
    names = _Names(variables, checkpoint.path)
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):  # (d_model, in_channels, 3) in both formats
        out[f"model.encoder.{conv}.weight"] = names.take(f"encoder/{conv}/weight")
        out[f"model.encoder.{conv}.bias"] = names.take(f"encoder/{conv}/bias")
    out["model.encoder.embed_positions.weight"] = names.take("encoder/position_encodings/encodings")  # (1500, d)
    for i in range(_layer_count(variables, "encoder")):
        _self_attention(names, f"encoder/layer_{i}", f"model.encoder.layers.{i}", out)
        _ffn(names, f"encoder/layer_{i}", f"model.encoder.layers.{i}", out)
    _layer_norm(names, "encoder/layer_norm", "model.encoder.layer_norm", out)

    out["model.decoder.embed_tokens.weight"] = names.take("decoder/embeddings/weight")  # (vocab, d)
    out["model.decoder.embed_positions.weight"] = names.take("decoder/position_encodings/encodings")  # (448, d)
    for i in range(_layer_count(variables, "decoder")):
        _self_attention(names, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
        _cross_attention(names, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
        _ffn(names, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out)
    _layer_norm(names, "decoder/layer_norm", "model.decoder.layer_norm", out)

    projection = names.take("decoder/projection/weight")
    bias = names.take_optional("decoder/projection/bias")
    if bias is not None and bool(bias.any()):
        raise UnsupportedModel(f"{checkpoint.path} has a bias on the output projection, which Whisper does not have.")
    if not projection_is_tied(checkpoint):
        out["proj_out.weight"] = projection
    names.take_optional("decoder/embeddings/multiply_by_sqrt_depth")
    leftover = names.leftover_weights()
    if leftover:
        raise CheckpointError(
            f"{checkpoint.path} holds weights lightpipe's Whisper has no place for: {', '.join(leftover[:10])}. "
            "It may come from a newer CTranslate2 Whisper layout."
        )
    return out


def projection_is_tied(checkpoint: Ct2Checkpoint) -> bool:
    """Whether the output projection is the token embedding matrix. CTranslate2's converter stores a
    tied projection once, as an alias; a projection stored apart becomes proj_out.weight (untied)."""
    aliases = checkpoint.aliases
    return (aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
            or aliases.get("decoder/embeddings/weight") == "decoder/projection/weight")


def _check_whisper(checkpoint: Ct2Checkpoint) -> None:
    if checkpoint.spec != WHISPER_SPEC:
        raise UnsupportedModel(
            f"{checkpoint.path} is a CTranslate2 {checkpoint.spec or 'model without a spec name'}; lightpipe reads "
            "CTranslate2 folders only for Whisper (WhisperSpec). Use the model's Hugging Face form instead."
        )
    # Flags of CTranslate2's generic decoder that Whisper never sets; a model that sets them would
    # compute something Hugging Face's Whisper cannot.
    if not checkpoint.scalar("decoder/pre_norm", 1):
        raise UnsupportedModel(f"{checkpoint.path} has a post-norm decoder; Whisper is pre-norm.")
    if checkpoint.scalar("decoder/alibi", 0):
        raise UnsupportedModel(f"{checkpoint.path} uses ALiBi positions, which Whisper does not.")
    activation = checkpoint.scalar("decoder/activation", 3)
    if activation not in ACTIVATIONS:
        raise UnsupportedModel(
            f"{checkpoint.path} uses CTranslate2 activation {activation}, which lightpipe does not know."
        )


# ----------------------------------------------------------------------------------------------
# Vocabulary and Hugging Face-style configs


def read_vocabulary(folder: str | Path) -> list[str]:
    """vocabulary.json (a JSON list) or vocabulary.txt (one token a line) -> tokens by id."""
    folder = Path(folder)
    path = next((folder / n for n in VOCABULARY_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder} has no {' or '.join(VOCABULARY_FILES)}; a CTranslate2 model needs one.")
    try:
        text = path.read_text(encoding="utf-8")
        tokens = json.loads(text) if path.suffix == ".json" else text.split("\n")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read: {e}") from e
    if path.suffix == ".txt" and tokens and tokens[-1] == "":
        tokens.pop()  # the newline after the last token
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path} must hold a list of token strings.")
    return tokens


def read_ct2_config(folder: str | Path) -> dict[str, Any]:
    """CTranslate2's config.json: suppress_ids, suppress_ids_begin, lang_ids, alignment_heads."""
    path = Path(folder) / CONFIG_JSON
    raw = read_json_object(path)
    if raw is None:
        raise CheckpointError(f"{path} is missing; a CTranslate2 model folder needs its config.json.")
    return raw


def _special_tokens(vocabulary: list[str], source: Path) -> WhisperTokens:
    """Whisper's control tokens, found in the vocabulary by text (their ids differ between English-only and
    multilingual models)."""
    try:
        return WhisperTokens.from_vocabulary(vocabulary)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e


def whisper_config(checkpoint: Ct2Checkpoint, ct2_config: dict[str, Any], vocabulary: list[str]) -> dict[str, Any]:
    """The config.json transformers would write for this model: sizes from the tensors' shapes,
    token ids from the vocabulary, suppressed tokens from CTranslate2's config.json."""
    _check_whisper(checkpoint)
    names = set(checkpoint.variables) | set(checkpoint.aliases)
    need = ("decoder/embeddings/weight", "encoder/conv1/weight", "encoder/position_encodings/encodings",
            "decoder/position_encodings/encodings", "encoder/layer_0/ffn/linear_0/weight",
            "decoder/layer_0/ffn/linear_0/weight")
    missing = [n for n in need if n not in names]
    if missing:
        raise CheckpointError(f"{checkpoint.path} lacks the Whisper variables {', '.join(missing)}.")
    vocab_size, d_model = checkpoint.shape("decoder/embeddings/weight")
    if len(vocabulary) != vocab_size:
        raise CheckpointError(
            f"{checkpoint.path.parent} has {len(vocabulary)} vocabulary entries but {vocab_size} token embeddings."
        )
    encoder_heads = checkpoint.scalar("encoder/num_heads")
    decoder_heads = checkpoint.scalar("decoder/num_heads")
    if not encoder_heads or not decoder_heads:
        raise CheckpointError(f"{checkpoint.path} does not record the number of attention heads (encoder/num_heads).")
    encoder_layers = _layer_count(names, "encoder")
    decoder_layers = _layer_count(names, "decoder")
    tokens = _special_tokens(vocabulary, checkpoint.path.parent)
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_dropout": 0.0,
        "activation_function": ACTIVATIONS[checkpoint.scalar("decoder/activation", 3)],
        "apply_spec_augment": False,
        "attention_dropout": 0.0,
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
        "bos_token_id": tokens.eot,
        "classifier_proj_size": 256,
        "d_model": d_model,
        "decoder_attention_heads": int(decoder_heads),
        "decoder_ffn_dim": checkpoint.shape("decoder/layer_0/ffn/linear_0/weight")[0],
        "decoder_layerdrop": 0.0,
        "decoder_layers": decoder_layers,
        "decoder_start_token_id": tokens.sot,
        "dropout": 0.0,
        "encoder_attention_heads": int(encoder_heads),
        "encoder_ffn_dim": checkpoint.shape("encoder/layer_0/ffn/linear_0/weight")[0],
        "encoder_layerdrop": 0.0,
        "encoder_layers": encoder_layers,
        "eos_token_id": tokens.eot,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "max_source_positions": checkpoint.shape("encoder/position_encodings/encodings")[0],
        "max_target_positions": checkpoint.shape("decoder/position_encodings/encodings")[0],
        "median_filter_width": 7,
        "num_hidden_layers": encoder_layers,
        "num_mel_bins": checkpoint.shape("encoder/conv1/weight")[1],
        "pad_token_id": tokens.eot,
        "scale_embedding": bool(checkpoint.scalar("decoder/scale_embeddings", 0)),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "tie_word_embeddings": projection_is_tied(checkpoint),
        # Weights are often stored in float16; like the Hugging Face copies, compute in float32 unless asked.
        "dtype": "float32",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": vocab_size,
    }


def is_multilingual(vocab_size: int) -> bool:
    """CTranslate2's rule (and faster-whisper's): English-only Whisper models have 51864 tokens."""
    return vocab_size > ENGLISH_ONLY_MAX_VOCAB


def generation_config(config: dict[str, Any], ct2_config: dict[str, Any], vocabulary: list[str],
                      source: Path | str = "") -> dict[str, Any]:
    """The generation_config.json transformers has for Whisper, from the HF-style `config` (see
    whisper_config), CTranslate2's config.json and the vocabulary. English-only models get no
    lang_to_id/task_to_id: transformers takes their presence as "detect the language"."""
    tokens = _special_tokens(vocabulary, Path(source))
    heads = ct2_config.get("alignment_heads")
    if not heads:  # what CTranslate2's converter assumes: every head of the second half of the layers
        layers, per_layer = config["decoder_layers"], config["decoder_attention_heads"]
        heads = list(itertools.product(range(layers // 2, layers), range(per_layer)))
    out: dict[str, Any] = {
        "alignment_heads": [[int(layer), int(head)] for layer, head in heads],
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
        "bos_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "eos_token_id": tokens.eot,
        "is_multilingual": is_multilingual(config["vocab_size"]),
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "max_length": config["max_target_positions"],
        "no_timestamps_token_id": tokens.no_timestamps,
        "pad_token_id": tokens.eot,
        "prev_sot_token_id": tokens.sot_prev,
        "return_timestamps": False,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
    }
    if out["is_multilingual"]:
        out["lang_to_id"] = _languages(ct2_config, vocabulary, tokens)
        tasks = dict(tokens.task_ids)
        out["task_to_id"] = {"transcribe": tasks.get("transcribe"), "translate": tasks.get("translate")}
    return dict(sorted(out.items()))


def _languages(ct2_config: dict[str, Any], vocabulary: list[str], tokens: WhisperTokens) -> dict[str, int]:
    """Language token -> id: CTranslate2's lang_ids when given, else the language tokens that follow
    <|startoftranscript|> in the vocabulary."""
    ids = ct2_config.get("lang_ids")
    if not ids:
        ids = list(itertools.takewhile(lambda i: i < len(vocabulary) and LANGUAGE_TOKEN.match(vocabulary[i]),
                                       itertools.count(tokens.sot + 1)))
    return {vocabulary[i]: int(i) for i in ids if 0 <= i < len(vocabulary)}


def preprocessor_config(folder: str | Path, num_mel_bins: int | None = None) -> dict[str, Any]:
    """The folder's preprocessor_config.json, or the one transformers has for Whisper: 16 kHz, 30 s
    windows, 80 (or, for large-v3, 128) mel bins as the model's first convolution takes."""
    folder = Path(folder)
    own = read_json_object(folder / "preprocessor_config.json")
    if own is not None:
        return own
    if num_mel_bins is None:
        num_mel_bins = load_ct2_config(folder)["num_mel_bins"]
    return {
        "chunk_length": CHUNK_LENGTH,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": num_mel_bins,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": SAMPLE_RATE,
    }


def tokenizer_config(folder: str | Path) -> dict[str, Any]:
    """The folder's tokenizer_config.json, or the one transformers has for Whisper's tokenizer: every
    special role is <|endoftext|>; no BOS is added (tokenizer.json's template adds the prompt)."""
    folder = Path(folder)
    own = read_json_object(folder / "tokenizer_config.json")
    if own is not None:
        return own
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": END_OF_TEXT,
        "clean_up_tokenization_spaces": True,
        "eos_token": END_OF_TEXT,
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": END_OF_TEXT,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "tokenizer_class": "WhisperTokenizer",
        "unk_token": END_OF_TEXT,
    }


# ----------------------------------------------------------------------------------------------
# Entry points


def load_ct2_config(folder: str | Path) -> dict[str, Any]:
    """A CTranslate2 Whisper folder -> its Hugging Face-style config.json dict (reads only headers)."""
    folder = Path(folder)
    return whisper_config(read_model_bin(folder / MODEL_BIN), read_ct2_config(folder), read_vocabulary(folder))


def load_ct2_generation_config(folder: str | Path) -> dict[str, Any]:
    """A CTranslate2 Whisper folder -> its Hugging Face-style generation_config.json dict."""
    folder = Path(folder)
    ct2_config, vocabulary = read_ct2_config(folder), read_vocabulary(folder)
    config = whisper_config(read_model_bin(folder / MODEL_BIN), ct2_config, vocabulary)
    return generation_config(config, ct2_config, vocabulary, folder)


def load_ct2_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """A CTranslate2 Whisper folder -> the state dict of transformers' WhisperForConditionalGeneration
    (stored dtype; int8/int16 weights dequantised to float32)."""
    return whisper_state_dict(read_model_bin(Path(folder) / MODEL_BIN))


def load_ct2_whisper(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A CTranslate2 Whisper folder -> (config dict, generation config dict, state dict), as the
    Hugging Face copy of the same model would give from config.json, generation_config.json and
    model.safetensors."""
    folder = Path(folder)
    if not is_ct2_folder(folder):
        raise CheckpointError(
            f"{folder} is not a CTranslate2 model folder: it needs model.bin, config.json (without model_type) and "
            f"{' or '.join(VOCABULARY_FILES)}."
        )
    checkpoint = read_model_bin(folder / MODEL_BIN)
    ct2_config, vocabulary = read_ct2_config(folder), read_vocabulary(folder)
    config = whisper_config(checkpoint, ct2_config, vocabulary)
    return config, generation_config(config, ct2_config, vocabulary, folder), whisper_state_dict(checkpoint)
