"""A loaded pipeline -> a folder in the Hugging Face layout, which transformers' from_pretrained and lightpipe load.

`save_pipeline(pipe, folder)` writes:

- config.json: the checkpoint's own (for GGUF files and CTranslate2 folders, the config lightpipe derived from
  them), with `dtype` set to the dtype of the weights written;
- model.safetensors: the model's weights under the checkpoint's key names. Loading renames nothing but what an
  architecture's `sanitize()` changes, so the inverse is small and lives here (`unsanitize`): GPT-2's Conv1D
  matrices go back to (in, out), Wav2Vec2's folded positional convolution back to weight_g / weight_v; weights
  tied to the token embeddings are written once, as transformers writes them;
- the tokenizer (tokenizer.json as lightpipe uses it, tokenizer_config.json and the checkpoint's other tokenizer
  files), the processor settings (preprocessor_config.json) and generation_config.json where the pipeline has them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .config import read_config_json, read_json_object
from .errors import CheckpointError, InvalidInput, UnsupportedModel

# Files copied as they are from the tokenizer's folder when it has them (tokenizer.json is written from the
# tokenizer lightpipe uses; tokenizer_config.json is copied, or written when the source has none).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


# ---------------------------------------------------------------------------------------------- weights
def _gpt2(state: dict[str, torch.Tensor], raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GPT-2's attention and MLP matrices are Conv1D in checkpoints: (in, out), the transpose of nn.Linear's."""
    from .models.gpt2 import _CONV1D

    return {k: (v.t() if _CONV1D.search(k) else v) for k, v in state.items()}


def _wav2vec2(state: dict[str, torch.Tensor], raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The positional convolution's weight back to weight norm's two tensors: v = weight, g = |weight| over every
    axis but the kernel axis (dim=2), so that g * v / |v| gives the weight again. SpecAugment's mask embedding,
    which loading drops (it only masks in training), is written as zeros where the config has the model make one."""
    out = {}
    masking = (raw.get("mask_time_prob", 0.05) or 0) > 0 or (raw.get("mask_feature_prob", 0) or 0) > 0
    base = next((k.split(".", 1)[0] + "." for k in state if k.startswith(("wav2vec2.", "hubert."))), "")
    hidden = raw.get("hidden_size")
    if masking and isinstance(hidden, int) and base + "masked_spec_embed" not in state:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        out[base + "masked_spec_embed"] = torch.zeros(hidden, dtype=dtype)
    for key, value in state.items():
        if key.endswith("pos_conv_embed.conv.weight"):
            prefix = key[: -len("weight")]
            out[prefix + "weight_g"] = value.float().norm(dim=(0, 1), keepdim=True).to(value.dtype)
            out[prefix + "weight_v"] = value
        else:
            out[key] = value
    return out


# model_type -> the inverse of that architecture's sanitize() renames (layout-only changes need none: every
# tensor is written contiguous). Architectures whose sanitize only drops or adds derived keys are absent.
UNSANITIZE = {"gpt2": _gpt2, "wav2vec2": _wav2vec2, "hubert": _wav2vec2}


def unsanitize(model: nn.Module, raw_config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names and layouts, contiguous, without tied copies. `raw_config`:
    the config.json written beside them (some inverses read it)."""
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", True):
        for target in getattr(model, "tied_weights", {}):
            state.pop(target, None)  # transformers ties them again on load, as it saved them: once
    inverse = UNSANITIZE.get(model.config.model_type)
    if inverse is not None:
        state = inverse(state, raw_config or {})
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        # One storage under several names (shared embeddings): written once, under its first name.
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = value.detach().to("cpu").contiguous()
    return out


def _architecture_name(model: nn.Module) -> str:
    for name, cls in models.architecture_module(model.config.model_type).ARCHITECTURES.items():
        if type(model) is cls:
            return name
    return type(model).__name__


DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _raw_config(model: nn.Module, source: Path | None) -> dict[str, Any]:
    """config.json's content: the checkpoint's own (or the one derived from a GGUF / CTranslate2 file), else the
    fields of the model's config."""
    from .formats import ct2, gguf

    raw: dict[str, Any] | None = None
    if source is not None:
        if gguf.is_gguf_path(source):
            raw = dict(gguf.load_config(source))
        elif ct2.is_ct2_folder(source):
            raw = dict(ct2.load_ct2_config(source))
        elif (source / "config.json").is_file():
            raw = dict(read_config_json(source))
    if raw is None:
        raw = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "num_labels_hint" and v is not None}
        raw["architectures"] = [_architecture_name(model)]
    architectures = raw.get("architectures") or []
    heads = [models.head_of_architecture(model.config.model_type, a) for a in architectures]
    if not any(models.head_class(model.config.model_type, h) is type(model) for h in heads if h):
        name = _architecture_name(model)  # the head that was loaded and is written
        if name not in models.architecture_module(model.config.model_type).ARCHITECTURES:
            raise UnsupportedModel(
                f"this pipeline runs part of a {model.config.model_type} checkpoint ({type(model).__name__}), which "
                "has no transformers class of its own to save as; save the whole model from its folder instead.")
        raw["architectures"] = [name]
    if model.config.id2label and ("id2label" in raw or model.config.num_labels != 2):
        raw["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
        raw["label2id"] = dict(model.config.label2id or {v: k for k, v in model.config.id2label.items()})
    raw.pop("torch_dtype", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    raw["dtype"] = DTYPE_NAMES.get(dtype, "float32")
    return raw


# ---------------------------------------------------------------------------------------------- the parts
def _source_folder(obj: Any, fallback: Path | None) -> Path | None:
    name = getattr(obj, "name_or_path", "") or ""
    path = Path(name) if name else fallback
    return path if path is not None and path.exists() else fallback


def _save_tokenizer(tokenizer, target: Path, fallback: Path | None) -> None:
    from .formats import ct2, gguf

    source = _source_folder(tokenizer, fallback)
    tokenizer.backend.save(str(target / "tokenizer.json"))
    copied = False
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)
                copied = copied or name == "tokenizer_config.json"
        if (source / "additional_chat_templates").is_dir():
            shutil.copytree(source / "additional_chat_templates", target / "additional_chat_templates",
                            dirs_exist_ok=True)
    if copied:
        return
    config: dict[str, Any] = {}
    if source is not None and not gguf.is_gguf_path(source) and ct2.is_ct2_folder(source, need_weights=False):
        config.update(ct2.tokenizer_config(source))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update({name: token for name, token in tokenizer.special_tokens.items()})
    if tokenizer.model_max_length < int(1e20):
        config["model_max_length"] = tokenizer.model_max_length
    config.update(padding_side=tokenizer.padding_side, truncation_side=tokenizer.truncation_side,
                  clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces)
    config["model_input_names"] = ["input_ids"] + (["token_type_ids"] if tokenizer.returns_token_type_ids else []) + [
        "attention_mask"]
    if isinstance(tokenizer.chat_template, str):
        config["chat_template"] = tokenizer.chat_template
    elif isinstance(tokenizer.chat_template, dict):
        config["chat_template"] = [{"name": k, "template": v} for k, v in tokenizer.chat_template.items()]
    _write_json(target / "tokenizer_config.json", config)


def _save_processor(pipe, target: Path, source: Path | None) -> None:
    from .formats import ct2, gguf

    if source is not None and source.is_dir():
        found = False
        for name in PROCESSOR_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)
                found = True
        if found:
            return
        if pipe.feature_extractor is not None and not gguf.is_gguf_path(source) and ct2.is_ct2_folder(source):
            _write_json(target / "preprocessor_config.json", ct2.preprocessor_config(source))
            return
    processor = pipe.image_processor
    if processor is not None and dataclasses.is_dataclass(processor):
        settings = {k: v for k, v in dataclasses.asdict(processor).items() if k != "kind"}
        _write_json(target / "preprocessor_config.json", {"image_processor_type": processor.kind, **settings})
    elif pipe.feature_extractor is not None:
        raise UnsupportedModel("this pipeline's feature extractor has no settings file to save "
                               "(preprocessor_config.json); build the pipeline from a checkpoint folder.")


def _save_generation_config(pipe, target: Path, source: Path | None) -> None:
    from .loading import load_generation_config

    if source is None:
        return
    settings = load_generation_config(source)  # derived for GGUF files and CTranslate2 folders
    if settings:
        _write_json(target / "generation_config.json", settings)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- entry point
def save_pipeline(pipe, save_directory: str | os.PathLike) -> Path:
    """Write `pipe`'s model, tokenizer, processor settings and generation config into `save_directory` (created if
    needed) in the Hugging Face layout. Returns the folder."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise InvalidInput(f"save_pretrained needs a folder path, not {type(save_directory).__name__}.")
    target = Path(os.fspath(save_directory)).expanduser()
    if target.exists() and not target.is_dir():
        raise InvalidInput(f"{target} exists and is not a folder.")
    model = pipe.model
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise UnsupportedModel("save_pretrained needs a lightpipe model (one loaded by lightpipe).")
    quantized = [type(m).__name__ for m in model.modules()
                 if type(m).__module__.startswith(("bitsandbytes", "lightpipe.quantize"))]
    if quantized or any(p.device.type == "meta" for p in model.parameters()):
        raise UnsupportedModel("save_pretrained writes full-precision weights on one device; this model is "
                               f"{'quantized (' + quantized[0] + ')' if quantized else 'offloaded (meta weights)'}. "
                               "Load it without quantization or device_map to save it.")
    source = getattr(pipe, "folder", None)
    source = Path(source) if source else (Path(model.name_or_path) if getattr(model, "name_or_path", "") else None)
    if source is not None and not source.exists():
        source = None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInput(f"cannot create the folder {target}: {e}") from e
    from safetensors.torch import save_file

    raw = _raw_config(model, source)
    _write_json(target / "config.json", raw)
    try:
        save_file(unsanitize(model, raw), str(target / "model.safetensors"), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(f"cannot write {target / 'model.safetensors'}: {e}") from e
    if pipe.tokenizer is not None:
        _save_tokenizer(pipe.tokenizer, target, source)
    if pipe.image_processor is not None or pipe.feature_extractor is not None:
        _save_processor(pipe, target, source)
    _save_generation_config(pipe, target, source)
    return target
