"""A checkpoint folder -> a ready model: config, meta build, sanitize, strict load, dtype, device.

The model is built on the meta device (no random initialisation, no memory), its weights are
read from safetensors by memory map, renamed only by the architecture's own `sanitize`, checked
strictly against the model's parameters, and assigned in place.
"""

from __future__ import annotations

import contextlib
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .config import BaseConfig, read_config_json, read_json_object
from .errors import CheckpointError, InvalidInput, UnsupportedModel
from .formats import ct2, gguf

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


def resolve_device(device: Any) -> torch.device:
    """device argument (None, "cpu", "cuda", "cuda:1", an int, a torch.device) -> torch.device."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise InvalidInput(f"device must be a string, an int or a torch.device, not {device!r}.")
    if isinstance(device, int):
        return torch.device("cpu") if device < 0 else torch.device("cuda", device)
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise InvalidInput(f"device {device!r} is not a valid device: {e}") from e
    raise InvalidInput(f"device must be a string, an int or a torch.device, not {type(device).__name__}.")


def check_device_available(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {device} was asked for, but this torch build sees no CUDA device.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInput(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")


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


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(_read_safetensors(path))
        else:
            state.update(_read_pytorch_bin(path))
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))  # memory-mapped: tensors page in as they are used
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again.") from e


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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], module, dtype: torch.dtype, source: str) -> None:
    state = _adapt_prefix(module.sanitize(state), model, module)
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
    cast = {k: (state[k].to(dtype) if state[k].is_floating_point() else state[k]) for k in expected}
    model.load_state_dict(cast, strict=True, assign=True)
    _retie(model)


def _retie(model: nn.Module) -> None:
    """Make tied parameters one tensor again (assign=True loaded them as separate copies)."""
    if not getattr(model.config, "tie_word_embeddings", True):
        return
    for target, src in getattr(model, "tied_weights", {}).items():
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, model.get_parameter(src))


def load_model(folder: Path, head: str, *, dtype: Any = "auto", device: Any = None, config: BaseConfig | None = None) -> nn.Module:
    folder = Path(folder)
    config = config or load_config(folder)
    resolve_dtype(dtype, config)  # a bad dtype or device fails before any file is read
    torch_device = resolve_device(device)
    check_device_available(torch_device)
    module = models.architecture_module(config.model_type)
    model = build_model(config, head)
    if gguf.is_gguf_path(folder):
        state = gguf.load_state_dict(folder, resolve_dtype(dtype, config))  # cast tensor by tensor: a lower peak
    else:
        state = ct2.load_ct2_state_dict(folder) if ct2.is_ct2_folder(folder) else read_state_dict(weight_files(folder))
    load_weights(model, state, module, resolve_dtype(dtype, config, state), str(folder))
    model.eval().requires_grad_(False)
    if torch_device.type != "cpu":
        model.to(torch_device)
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
