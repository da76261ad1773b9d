"""A checkpoint folder -> a ready model: config, meta build, sanitize, strict load, dtype, device.

The model is built on the meta device (no random initialisation, no memory), its weights are
read from safetensors by memory map, renamed only by the architecture's own `sanitize`, checked
strictly against the model's parameters, and assigned in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .config import BaseConfig, read_config_json, read_json_object
from .errors import CheckpointError, InvalidInput, UnsupportedModel
from .formats import ct2, gguf
from .models.layers import DEFER_LAYOUT

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@contextlib.contextmanager
def one_load():
    """The reading of one checkpoint by one pipeline() call: readers of other formats parse each file's
    header once within it (config, weights and generation config read the same model.bin), then let go."""
    with ct2.parse_once():
        yield


def load_config(folder: Path) -> BaseConfig:
    # A CTranslate2 (faster-whisper) folder has no model_type: its config comes from model.bin's shapes.
    # A GGUF file carries its config as metadata.
    if gguf.is_gguf_path(folder):
        raw = gguf.load_config(folder)
    else:
        raw = ct2.load_ct2_config(folder) if ct2.is_ct2_folder(folder) else read_config_json(folder)
    model_type = raw.get("model_type")
    if not model_type:
        raise CheckpointError(f"{folder}/config.json names no model_type.")
    return models.architecture_module(model_type).Config.from_dict(raw)


def resolve_dtype(dtype: Any, config: BaseConfig, state: dict[str, torch.Tensor] | None = None) -> torch.dtype:
    """dtype argument ("auto", a name, a torch.dtype or None) -> the torch dtype to compute in.

    "auto" (and None) take the dtype config.json names; when it names none, the dtype of the first
    floating-point weight in `state` (as transformers does); float32 when neither says."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        saved = config.dtype
        if saved:
            return DTYPES.get(str(saved).replace("torch.", ""), torch.float32)
        stored = next((t.dtype for t in (state or {}).values() if t.is_floating_point()), None)
        return stored if stored in DTYPES.values() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidInput(f"dtype {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise InvalidInput(f"dtype {dtype!r} is not supported; use 'auto', 'float32', 'float16' or 'bfloat16'.")


# Device types torch names that lightpipe can run on when this machine has them, each with the torch module that
# says so (npu and others come from their vendors' extensions of torch).
ACCELERATORS = ("cuda", "xpu", "npu", "mps", "hpu", "mlu", "musa")


def _backend(kind: str):
    if kind == "mps":
        return getattr(torch.backends, "mps", None)
    return getattr(torch, kind, None)


def _accelerator_available(kind: str) -> bool:
    backend = _backend(kind)
    try:
        return bool(backend is not None and backend.is_available())
    except Exception:  # a vendor extension half installed: treat as absent
        return False


def _device_count(kind: str) -> int:
    if kind == "mps":
        return 1
    try:
        return int(_backend(kind).device_count())
    except Exception:
        return 1


def available_devices() -> list[str]:
    """The devices this process can run on: "cpu", then each accelerator ("cuda:0", "cuda:1", "mps", ...)."""
    names = ["cpu"]
    for kind in ACCELERATORS:
        if _accelerator_available(kind):
            count = _device_count(kind)
            names += [kind] if kind == "mps" else [f"{kind}:{i}" for i in range(count)]
    return names


def resolve_device(device: Any) -> torch.device:
    """device argument -> torch.device, in every form transformers accepts: None or -1 (the CPU), an int (that
    accelerator: cuda:N, else xpu/npu/mps where that is what the machine has), "cpu", "cuda", "cuda:1", "mps",
    "xpu", "npu", or a torch.device. "meta" holds no data and is refused."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool):
        raise InvalidInput(f"device must be a string, an int or a torch.device, not {device!r}.")
    if isinstance(device, int):
        if device < 0:
            return torch.device("cpu")
        kind = next((k for k in ACCELERATORS if _accelerator_available(k)), "cuda")
        return torch.device(kind) if kind == "mps" else torch.device(kind, device)
    if isinstance(device, str):
        text = device.strip()
        if text.lstrip("-").isdigit():  # "0" as the command line gives it
            return resolve_device(int(text))
        try:
            device = torch.device(text)
        except RuntimeError as e:
            raise InvalidInput(f"device {text!r} is not a device torch knows ({e}); "
                               f"available here: {', '.join(available_devices())}.") from e
    if isinstance(device, torch.device):
        if device.type == "meta":
            raise InvalidInput("device 'meta' holds no weights: a pipeline cannot run there. "
                               f"Available here: {', '.join(available_devices())}.")
        return device
    raise InvalidInput(f"device must be a string, an int or a torch.device, not {type(device).__name__}.")


def check_device_available(device: torch.device) -> None:
    """InvalidInput naming the devices there are, unless `device` is one of them."""
    if device.type == "cpu":
        return
    available = ", ".join(available_devices())
    if device.type not in ACCELERATORS:
        raise InvalidInput(f"device {str(device)!r} is not a device lightpipe runs on; available here: {available}.")
    if not _accelerator_available(device.type):
        kind = {"cuda": "CUDA", "xpu": "XPU", "npu": "NPU", "mps": "MPS"}.get(device.type, device.type)
        raise InvalidInput(f"device {str(device)!r} was asked for, but this machine (and this torch build) has no "
                           f"{kind} device; available here: {available}.")
    if device.index is not None and device.type != "mps" and device.index >= _device_count(device.type):
        raise InvalidInput(f"device {str(device)!r} does not exist: {_device_count(device.type)} {device.type} "
                           f"device(s) visible; available here: {available}.")


# ----------------------------------------------------------------------------------------------
# Reading weights


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors first; sharded checkpoints through their index."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index_name).is_file():
            try:
                shards = sorted(set(read_json_object(folder / index_name)["weight_map"].values()))
            except (CheckpointError, KeyError, TypeError, AttributeError) as e:  # not JSON, or no weight_map
                raise CheckpointError(f"{folder / index_name} is not a valid shard index ({e}).") from e
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder} lacks the shards {missing} named by {index_name}.")
            return [folder / s for s in shards]
    raise CheckpointError(
        f"{folder} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} or {PYTORCH_BIN_INDEX}."
    )


def read_state_dict(files: list[Path], maps: list[MappedFile] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, not yet copied: views of the memory-mapped files (appended to `maps`, whose pages
    `MappedFile.release` lets go of)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(_read_safetensors(path, maps))
        else:
            state.update(_read_pytorch_bin(path))
    return state


# safetensors dtype names -> torch dtypes (the formats lightpipe's models can hold).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MappedFile:
    """One weight file mapped into memory privately (copy-on-write, never written back).

    Tensors read from it are views of the mapping: nothing is copied until a tensor is cast or placed. The pages
    read so far count in the process's resident memory until `release()` drops them from this mapping (the
    kernel's page cache keeps them; the next read faults them back in), which lets a load stream a checkpoint
    larger than the memory left beside the model."""

    def __init__(self, path: Path):
        import mmap

        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8) if self.map is not None else torch.empty(0, dtype=torch.uint8)

    def tensor(self, start: int, end: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        raw = self.bytes[start:end]
        if start % dtype.itemsize:  # unaligned for its dtype: a view is impossible, copy these bytes out
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def release(self) -> None:
        import mmap

        if self.map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)


def _read_safetensors(path: Path, maps: list[MappedFile] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file as views of its private memory map (the header parsed here: 8 bytes of
    little-endian length, a JSON table of dtype, shape and byte offsets, then the data)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        mapped = MappedFile(path)
        data_start = 8 + length
        state = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key} has dtype {entry['dtype']}, which lightpipe does not read")
            begin, end = (data_start + int(o) for o in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            if end > mapped.size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key} lies outside the file or does not match its shape")
            state[key] = mapped.tensor(begin, end, dtype, shape)
    except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again.") from e
    if maps is not None:
        maps.append(mapped)
    return state


def _read_pytorch_bin(path: Path) -> dict[str, torch.Tensor]:
    # Memory-map the zip format of torch >= 1.6; the legacy format of older checkpoints cannot be mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds here (pickle, zip, unsafe globals)
        raise CheckpointError(
            f"{path} could not be read safely ({type(e).__name__}: {e}). lightpipe loads .bin weights only "
            "with weights_only=True; convert the checkpoint to safetensors if it needs more."
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors) but a {type(state).__name__}.")
    odd = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"{path} is not a plain state dict: {', '.join(odd[:5])} is not a tensor.")
    return state


# ----------------------------------------------------------------------------------------------
# Building and loading


def build_model(config: BaseConfig, head: str) -> nn.Module:
    cls = models.head_class(config.model_type, head)
    with torch.device("meta"):
        return cls(config)


def _adapt_prefix(state: dict[str, torch.Tensor], model: nn.Module, module) -> dict[str, torch.Tensor]:
    """Match a base-model checkpoint to a head model and a head checkpoint to a base model."""
    prefix = model.base_model_prefix + "."
    is_head = hasattr(model, model.base_model_prefix)
    has_prefix = any(k.startswith(prefix) for k in state)
    if is_head and not has_prefix:
        own = set(model.state_dict())
        return {(k if k in own else prefix + k): v for k, v in state.items()}
    if not is_head and has_prefix:
        # Keys outside the prefix belong to a task head this base model does not have.
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _drop_optional_modules(model: nn.Module, missing: set[str]) -> set[str]:
    """Remove optional submodules (e.g. a pooler) the checkpoint has no weights for."""
    for name in getattr(model, "optional_modules", ()):
        under = {k for k in missing if k.startswith(name + ".")}
        if under:
            setattr(model, name, None)
            missing -= under
    return missing


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], module, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors renamed by the architecture's `sanitize`, matched to the model's keys (prefixes,
    tied weights, optional modules dropped) and checked by name and shape; nothing copied yet."""
    token = DEFER_LAYOUT.set(True)  # layouts sanitize asks for are made by `materialize`, in the one copy
    try:
        state = _adapt_prefix(module.sanitize(state), model, module)
    finally:
        DEFER_LAYOUT.reset(token)
    expected = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", True):
        for target, src in getattr(model, "tied_weights", {}).items():
            if target not in state and src in state:
                state[target] = state[src]
    missing = _drop_optional_modules(model, set(expected) - set(state))
    expected = model.state_dict()
    ignored = [re.compile(p) for p in getattr(module, "IGNORED_KEYS", ())]
    unexpected = {k for k in set(state) - set(expected) if not any(p.search(k) for p in ignored)}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(sorted(missing)[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(sorted(unexpected)[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError(
            f"the weights in {source} do not fit {type(model).__name__} ({'; '.join(parts)}). "
            "Check that the checkpoint was trained for this task and architecture."
        )
    for key, ref in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{key} in {source} has shape {tuple(tensor.shape)}, but config.json implies {tuple(ref.shape)}."
            )
    return {k: state[k] for k in expected}


# Bytes placed between two releases of the mapped files' pages: the most file pages a load holds beside the model.
RELEASE_EVERY = 64 << 20


TRANSPOSE_ROWS = 32  # rows per block of a transposing copy (see materialize)


def materialize(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a checkpoint tensor (a view of a mapped file, or sanitize's output) in `dtype` on `device`, in the
    memory layout sanitize chose for float32: its strides are kept (copy=True preserves them), and a matrix marked by
    layers.by_input_rows is laid out (in, out) in this same copy. Half-precision matrices are made contiguous."""
    if tensor.dim() == 2 and dtype in (torch.float16, torch.bfloat16):
        # Half-precision products (oneDNN's bfloat16 kernels on the CPU, cuBLAS) want the plain (out, in) layout:
        # on the CPU a one-row float16 product over an (in, out) matrix is ~40x slower, bfloat16 ~1.4x.
        return tensor.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    if getattr(tensor, "lightpipe_by_input_rows", False) and tensor.dim() == 2:
        if torch.device(device).type != "cpu":
            return tensor.to(device=device, dtype=dtype).t().contiguous().t()  # transposed where it is fast
        out = torch.empty_strided(tuple(tensor.shape), (1, tensor.shape[0]), dtype=dtype, device=device)
        # A transposing copy in blocks of rows stays in cache: ~1.6x faster than one copy of the whole matrix.
        for start in range(0, tensor.shape[0], TRANSPOSE_ROWS):
            out[start:start + TRANSPOSE_ROWS].copy_(tensor[start:start + TRANSPOSE_ROWS])
        return out
    return tensor.to(device=device, dtype=dtype, copy=True)


class Placer:
    """Where each weight of a load goes: `place(key, tensor, dtype)` returns the weight copied (never a view of a
    checkpoint file) in its final dtype on its final device. A subclass (lightpipe.dispatch) places by a device
    map and may defer some weights (returning None) until `finish()`."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def place(self, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return materialize(tensor, self.device, dtype)

    def finish(self) -> dict[str, torch.Tensor]:
        return {}


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, placer: Placer | None = None,
                   maps: list[MappedFile] = ()) -> None:
    """Put the fitted `state` into the meta-built model tensor by tensor, each straight to its final dtype and
    place; the checkpoint's mapped pages are let go of every RELEASE_EVERY bytes, so a load's peak memory stays
    near the model's own size. Emptied `state` as it goes."""
    placer = placer or Placer()
    tied = dict(getattr(model, "tied_weights", {})) if getattr(model.config, "tie_word_embeddings", True) else {}
    tied = {k: v for k, v in tied.items() if k in state and v in state}
    final: dict[str, torch.Tensor] = {}
    pending = 0
    for key in [k for k in state if k not in tied]:
        tensor = state.pop(key)
        placed = placer.place(key, tensor, dtype if tensor.is_floating_point() else tensor.dtype)
        if placed is not None:
            final[key] = placed
        pending += tensor.nbytes  # the file pages this weight was read from
        del tensor
        if pending >= RELEASE_EVERY:
            for mapped in maps:
                mapped.release()
            pending = 0
    final.update(placer.finish())
    for mapped in maps:
        mapped.release()
    for target, src in tied.items():
        final[target] = final[src]
    model.load_state_dict(final, strict=True, assign=True)
    _retie(model)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], module, dtype: torch.dtype, source: str) -> None:
    assign_weights(model, fit_state(model, state, module, source), dtype)


def _retie(model: nn.Module) -> None:
    """Make tied parameters one tensor again (assign=True loaded them as separate copies)."""
    if not getattr(model.config, "tie_word_embeddings", True):
        return
    for target, src in getattr(model, "tied_weights", {}).items():
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, model.get_parameter(src))


def load_model(folder: Path, head: str, *, dtype: Any = "auto", device: Any = None, config: BaseConfig | None = None,
               device_map: Any = None, max_memory: Any = None, offload_folder: Any = None) -> nn.Module:
    """Load the checkpoint in `folder` as the model class of `head`.

    device places the whole model; device_map ("auto", "balanced", "balanced_low_0", "sequential" or a dict of
    module name -> device, with `max_memory` and `offload_folder`) spreads its blocks over devices, the CPU and the
    disk (see lightpipe.dispatch). Either way each weight goes from the mapped file straight to its place."""
    from . import dispatch

    folder = Path(folder)
    config = config or load_config(folder)
    resolve_dtype(dtype, config)  # a bad dtype or device fails before any file is read
    if device_map is not None:
        if device is not None:
            raise InvalidInput("give device or device_map, not both: they would place the model twice.")
        request = dispatch.Request.from_args(device_map, max_memory, offload_folder)
    else:
        if max_memory is not None or offload_folder is not None:
            raise InvalidInput("max_memory and offload_folder apply to a device_map: pass device_map='auto' too.")
        torch_device = resolve_device(device)
        check_device_available(torch_device)
    module = models.architecture_module(config.model_type)
    model = build_model(config, head)
    maps: list[MappedFile] = []
    if gguf.is_gguf_path(folder):
        if device_map is None:
            from . import native

            native.prepare()  # its kernel for quantised blocks (attach_blocks below), built beside the load
        state = gguf.load_state_dict(folder, resolve_dtype(dtype, config))  # cast tensor by tensor: a lower peak
    else:
        state = ct2.load_ct2_state_dict(folder) if ct2.is_ct2_folder(folder) else read_state_dict(weight_files(folder), maps)
    torch_dtype = resolve_dtype(dtype, config, state)
    state = fit_state(model, state, module, str(folder))
    if device_map is not None:
        placer = dispatch.plan(model, request, torch_dtype)
    else:
        placer = Placer(torch_device)
    assign_weights(model, state, torch_dtype, placer, maps)
    del state, maps
    model.eval().requires_grad_(False)
    if device_map is not None:
        dispatch.attach(model, placer)
    elif gguf.is_gguf_path(folder):
        gguf.attach_blocks(model, folder)  # quantised blocks kept for decode steps (a no-op for float files)
    model.name_or_path = str(folder)
    return model


def load_generation_config(folder: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent); for a CTranslate2 Whisper folder, the one
    transformers would have for the same model."""
    folder = Path(folder)
    if gguf.is_gguf_path(folder):
        return gguf.generation_dict(gguf.read(folder))
    if ct2.is_ct2_folder(folder):
        return ct2.load_ct2_generation_config(folder)
    return read_json_object(folder / "generation_config.json") or {}
